"""Built-in rule sets a policy includes by name (`[[rule]] include = "pypi"`), and the implicit
DNS-over-HTTPS deny list. Plain data: the loader validates presets like user rules."""

from __future__ import annotations

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
