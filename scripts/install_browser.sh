#!/usr/bin/env bash
# Install headless Chromium + its WebDriver (Debian packages) and CJK fonts for the browser UI test
# (tests/test_gradio_demo.py) and for screenshots with Chinese text. Idempotent: exits 0 at once
# when everything is already there. Needs root (or sudo) and Debian/Ubuntu's apt.
set -euo pipefail

PACKAGES=(chromium chromium-driver fonts-noto-cjk)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ ${#missing[@]} -eq 0 ] && [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    echo "install_browser: chromium, chromedriver and CJK fonts already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "install_browser: need root to install ${missing[*]}" >&2; exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: apt-get not found; install ${missing[*]} with your package manager" >&2
    exit 1
fi

echo "install_browser: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_browser: apt-get failed" >&2
    exit 1
fi
echo "install_browser: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium ?'), $(/usr/bin/chromedriver --version 2>/dev/null | cut -d' ' -f1-2)"
