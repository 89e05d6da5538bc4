"""`capsem setup` and `capsem uninstall`: put on a host what capsem needs, and take it off again.

hostos.py  which host release this is and the packages it needs (sans-IO)
plan.py    what `capsem setup` would do, from facts about the host (sans-IO)
facts.py   the facts: installed packages, proxy envs, images (reads the host)
steps.py   carry out a plan's steps (apt-get, venv + pip, image build, retire old images)
removal.py what `capsem uninstall` removes (plan sans-IO, then removal)
cli.py     the two sub-commands, their progress display and summary

The packages-only path (`make system` before any venv exists) imports nothing outside the
standard library: python3 -m capsem_vm.setup --no-proxy-env --no-image.
"""
