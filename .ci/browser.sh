#!/usr/bin/env bash
# What the browser tests (tests/browser) need: Debian's chromium (playwright drives it; it never downloads a
# browser of its own). The Python driver comes with the test extras (`make install`).
set -u
command -v chromium >/dev/null && exit 0
if command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }
fi
command -v chromium >/dev/null || echo "warning: chromium could not be installed; tests/browser will be skipped" >&2
exit 0
