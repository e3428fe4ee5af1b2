#!/usr/bin/env bash
# Installs Debian's headless Chromium for the page screenshot tests when it is missing
# and this user may install packages; otherwise those tests skip with a reason.
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing chromium for the screenshot tests..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
    >/dev/null 2>&1 || echo "chromium could not be installed; screenshot tests will skip" >&2
fi
exit 0
