#!/usr/bin/env bash
# Installs what tests/test_report_browser.py needs: Debian's headless Chromium and a CJK font, so the HTML
# report's Chinese answers render as glyphs rather than missing-glyph boxes. Idempotent: does nothing when
# both are present. Needs root (or sudo) and the Debian package mirror.
set -euo pipefail

packages=(chromium fonts-noto-cjk)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "setup-browser: chromium and fonts-noto-cjk already installed"
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "setup-browser: run as root or install sudo" >&2; exit 1; }
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update
$sudo apt-get install -y --no-install-recommends "${missing[@]}"
# Make the new font visible to Chromium's fontconfig right away.
command -v fc-cache >/dev/null && fc-cache -f >/dev/null 2>&1 || true
/usr/bin/chromium --version
