"""Built-in rule sets a policy includes by name (`[[rule]] include = "pypi"`), and the implicit
DNS-over-HTTPS deny list. Plain data: the loader validates presets like user rules."""

from __future__ import annotations

_CONDA_FORGE = {"name": "conda-forge", "host": "conda.anaconda.org", "scheme": "https", "methods": ["GET", "HEAD"],
                "paths": ["/conda-forge/*"], "action": "allow",
                "reason": "conda reads the conda-forge channel (read-only)"}
# where huggingface.co redirects file downloads (see "huggingface-models" below)
_HF_CDN = [
    {"name": "hf-cdn", "host": "*.hf.co", "scheme": "https", "methods": ["GET", "HEAD"],
     "action": "allow", "reason": "Hugging Face CDN (read-only)"},
    {"name": "hf-cdn-legacy", "host": "*.huggingface.co", "scheme": "https", "methods": ["GET", "HEAD"],
     "paths": ["/repos/*"], "action": "allow", "reason": "Hugging Face's older CDN (read-only)"},
]

PRESETS: dict[str, list[dict]] = {
    # pip install from PyPI, read-only: the index and the file host, GET/HEAD over HTTPS only.
    "pypi": [
        {"name": "pypi-index", "host": "pypi.org", "scheme": "https", "methods": ["GET", "HEAD"],
         "paths": ["/simple", "/simple/*", "/pypi/*"], "action": "allow",
         "reason": "pip reads the PyPI index (read-only)"},
        {"name": "pypi-files", "host": "files.pythonhosted.org", "scheme": "https",
         "methods": ["GET", "HEAD"], "paths": ["/packages/*"], "action": "allow",
         "reason": "pip downloads packages from PyPI's file host (read-only)"},
    ],
    # git clone/fetch over HTTPS from github.com; pushing (git-receive-pack) stays denied.
    "github-clone": [
        {"name": "github-push", "host": "github.com", "paths": ["*/git-receive-pack"],
         "action": "deny", "reason": "pushing to GitHub is not allowed by this preset"},
        {"name": "github-clone", "host": "github.com", "scheme": "https", "methods": ["GET", "POST"],
         "paths": ["/*/info/refs", "/*/git-upload-pack"], "action": "allow",
         "reason": "git clone/fetch over HTTPS"},
        {"name": "github-codeload", "host": "codeload.github.com", "scheme": "https", "methods": ["GET", "HEAD"],
         "action": "allow", "reason": "GitHub archive downloads"},
    ],
    # conda's default channels and conda-forge, read-only. Hosts from conda's own source,
    # conda/base/constants.py: DEFAULT_CHANNELS_UNIX = https://repo.anaconda.com/pkgs/main and /pkgs/r;
    # DEFAULT_CHANNEL_ALIAS = https://conda.anaconda.org (a channel name N is <alias>/N, so conda-forge
    # is conda.anaconda.org/conda-forge; other anaconda.org channels need a path of their own).
    "conda": [
        {"name": "conda-defaults", "host": "repo.anaconda.com", "scheme": "https", "methods": ["GET", "HEAD"],
         "paths": ["/pkgs/main/*", "/pkgs/r/*"], "action": "allow",
         "reason": "conda reads its default channels (read-only)"},
        _CONDA_FORGE,
    ],
    "conda-forge": [
        _CONDA_FORGE,
    ],
    # npm install from the public registry, read-only. Host from npm's source,
    # workspaces/config/lib/definitions/definitions.js (`registry`, default https://registry.npmjs.org/);
    # tarballs are on the same host (/<name>/-/<name>-<version>.tgz), packages at the root, so no path
    # narrows it. Left out: `npm audit` (POST /-/npm/v1/security/..., on by default: it sends the
    # dependency list; install then only warns) and publishing.
    "npm": [
        {"name": "npm-registry", "host": "registry.npmjs.org", "scheme": "https", "methods": ["GET", "HEAD"],
         "action": "allow", "reason": "npm reads the public registry (read-only)"},
    ],
    # install.packages() from CRAN, read-only: the cloud mirror (the first entry, "0-Cloud", of R's
    # doc/CRAN_mirrors.csv, and the repos most setups name) and the master site; R's contrib.url()
    # reads <repos>/src/contrib (sources: PACKAGES*, *.tar.gz, Archive/) and <repos>/bin/... (binaries).
    "cran": [
        {"name": "cran", "host": "cloud.r-project.org", "scheme": "https", "methods": ["GET", "HEAD"],
         "paths": ["/src/contrib/*", "/bin/*"], "action": "allow", "reason": "R reads CRAN (read-only)"},
        {"name": "cran-master", "host": "cran.r-project.org", "scheme": "https", "methods": ["GET", "HEAD"],
         "paths": ["/src/contrib/*", "/bin/*"], "action": "allow", "reason": "R reads CRAN (read-only)"},
    ],
    # Hugging Face model and dataset downloads through huggingface_hub, read-only. From
    # huggingface_hub's source, src/huggingface_hub/constants.py: ENDPOINT https://huggingface.co, files at
    # /{repo_id}/resolve/{revision}/{filename} with "datasets/" before dataset repo ids
    # (REPO_TYPES_URL_PREFIXES); hf_api.py reads /api/models/... and /api/datasets/... (repo info, file
    # lists, xet read tokens) and POSTs /api/{type}s/{id}/paths-info/{rev} (HfFileSystem, used by
    # `datasets`). File bodies come from where huggingface.co redirects (a server choice, not in the
    # client: cdn-lfs.hf.co, cdn-lfs-us-1.hf.co, cas-bridge.xethub.hf.co, ...; older ones under
    # huggingface.co), so the CDN rules name the suffixes, GET/HEAD only. Note: dataset files also
    # match the models rule's "/*/resolve/*" (a glob's * spans '/'); the presets state intent, not isolation.
    "huggingface-models": [
        {"name": "hf-models", "host": "huggingface.co", "scheme": "https", "methods": ["GET", "HEAD"],
         "paths": ["/api/models/*", "/*/resolve/*"], "action": "allow",
         "reason": "Hugging Face model downloads (read-only)"},
        *_HF_CDN,
    ],
    "huggingface-datasets": [
        {"name": "hf-datasets", "host": "huggingface.co", "scheme": "https", "methods": ["GET", "HEAD"],
         "paths": ["/api/datasets/*", "/datasets/*"], "action": "allow",
         "reason": "Hugging Face dataset downloads (read-only)"},
        {"name": "hf-datasets-paths", "host": "huggingface.co", "scheme": "https", "methods": ["POST"],
         "paths": ["/api/datasets/*/paths-info/*"], "action": "allow",
         "reason": "file metadata for Hugging Face datasets (a read sent as POST)"},
        *_HF_CDN,
    ],
    # LLM APIs: the hosts and path prefixes of the providers' own Python SDKs (openai-python
    # src/openai/_client.py: base_url https://api.openai.com/v1; anthropic-sdk-python
    # src/anthropic/_client.py: https://api.anthropic.com, paths /v1/...; googleapis/python-genai
    # google/genai/_api_client.py: https://generativelanguage.googleapis.com/ with api_version v1beta,
    # file uploads under /upload/; mistralai/client-python: server https://api.mistral.ai, paths /v1/...).
    # GET and POST only. The API key is yours to declare as a [[credential]] (OpenAI, Mistral:
    # header Authorization, format "Bearer {value}"; Anthropic: x-api-key; Gemini: x-goog-api-key).
    "openai": [
        {"name": "openai", "host": "api.openai.com", "scheme": "https", "methods": ["GET", "POST"],
         "paths": ["/v1/*"], "action": "allow", "reason": "OpenAI API"},
    ],
    "anthropic": [
        {"name": "anthropic", "host": "api.anthropic.com", "scheme": "https", "methods": ["GET", "POST"],
         "paths": ["/v1/*"], "action": "allow", "reason": "Anthropic API"},
    ],
    "gemini": [
        {"name": "gemini", "host": "generativelanguage.googleapis.com", "scheme": "https",
         "methods": ["GET", "POST"], "paths": ["/v1beta/*", "/v1/*", "/v1alpha/*", "/upload/*"], "action": "allow",
         "reason": "Google Gemini API"},
    ],
    "mistral": [
        {"name": "mistral", "host": "api.mistral.ai", "scheme": "https", "methods": ["GET", "POST"],
         "paths": ["/v1/*"], "action": "allow", "reason": "Mistral API"},
    ],
    # apt in the guest, read-only, HTTP and HTTPS (apt's integrity comes from the signed Release files,
    # not the transport). The archive and security hosts of Debian's default sources (what
    # capsem_vm/image/debian.py uses too: http://deb.debian.org/debian and /debian-security;
    # security.debian.org/debian-security in older sources.list files) and Ubuntu's
    # (archive.ubuntu.com/ubuntu, security.ubuntu.com/ubuntu, ports.ubuntu.com/ubuntu-ports).
    "debian": [
        {"name": "debian-archive", "host": "deb.debian.org", "scheme": ["http", "https"], "methods": ["GET", "HEAD"],
         "paths": ["/debian/*", "/debian-security/*"], "action": "allow", "reason": "apt reads the Debian archive"},
        {"name": "debian-security", "host": "security.debian.org", "scheme": ["http", "https"],
         "methods": ["GET", "HEAD"], "paths": ["/debian-security/*"], "action": "allow",
         "reason": "apt reads Debian security updates"},
    ],
    "ubuntu": [
        {"name": "ubuntu-archive", "host": "archive.ubuntu.com", "scheme": ["http", "https"],
         "methods": ["GET", "HEAD"], "paths": ["/ubuntu/*"], "action": "allow", "reason": "apt reads the Ubuntu archive"},
        {"name": "ubuntu-security", "host": "security.ubuntu.com", "scheme": ["http", "https"],
         "methods": ["GET", "HEAD"], "paths": ["/ubuntu/*"], "action": "allow",
         "reason": "apt reads Ubuntu security updates"},
        {"name": "ubuntu-ports", "host": "ports.ubuntu.com", "scheme": ["http", "https"],
         "methods": ["GET", "HEAD"], "paths": ["/ubuntu-ports/*"], "action": "allow",
         "reason": "apt reads the Ubuntu archive (other architectures)"},
    ],
    # Hugging Face Hub downloads, read-only.
    "huggingface": [
        {"name": "hf-hub", "host": "huggingface.co", "scheme": "https", "methods": ["GET", "HEAD"],
         "action": "allow", "reason": "Hugging Face Hub (read-only)"},
        {"name": "hf-cdn", "host": "*.hf.co", "scheme": "https", "methods": ["GET", "HEAD"],
         "action": "allow", "reason": "Hugging Face CDN (read-only)"},
    ],
}

# Known public DNS-over-HTTPS endpoints. Why: DoH would let the guest resolve (and tunnel data
# through) names outside our DNS responder. Denied first unless `[settings] allow_doh = true`.
DOH_HOSTS = (
    "dns.google", "dns.google.com", "8.8.8.8", "8.8.4.4", "2001:4860:4860::8888", "2001:4860:4860::8844",
    "cloudflare-dns.com", "*.cloudflare-dns.com", "one.one.one.one", "1.1.1.1", "1.0.0.1",
    "2606:4700:4700::1111", "2606:4700:4700::1001", "security.cloudflare-dns.com",
    "dns.quad9.net", "dns9.quad9.net", "dns10.quad9.net", "dns11.quad9.net", "9.9.9.9", "149.112.112.112",
    "doh.opendns.com", "dns.opendns.com", "doh.familyshield.opendns.com", "208.67.222.222", "208.67.220.220",
    "dns.adguard.com", "dns.adguard-dns.com", "*.adguard-dns.com", "doh.cleanbrowsing.org",
    "dns.nextdns.io", "*.nextdns.io", "doh.mullvad.net", "dns.mullvad.net", "doh.dns.sb", "dns.alidns.com",
    "doh.pub", "dns.twnic.tw", "doh.xfinity.com", "dns.controld.com", "freedns.controld.com",
    "doh.libredns.gr", "dns.switch.ch", "dns.digitale-gesellschaft.ch",
)

DOH_RULES: list[dict] = [
    {"name": "doh", "host": h, "action": "deny",
     "reason": "DNS-over-HTTPS endpoint: name resolution must go through capsem's DNS"}
    for h in DOH_HOSTS
] + [
    {"name": "doh-path", "host": "*", "paths": ["/dns-query", "/dns-query/*"], "action": "deny",
     "reason": "DNS-over-HTTPS path: name resolution must go through capsem's DNS"},
]
