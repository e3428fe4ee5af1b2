"""Headless Chromium screenshots of the project's HTML pages, for tests a person can check."""

import shutil
import subprocess
import tempfile

import pytest

CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
                  '--no-first-run', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync', '--hide-scrollbars']


def chromium():
  binary = shutil.which('chromium') or shutil.which('chromium-browser')
  if not binary:
    pytest.skip('chromium is not installed (scripts/ensure_chromium.sh installs it)')
  return binary


def screenshot(html_path, png_path, width=1200, height=900):
  """Renders a local HTML file to a PNG; returns the PNG's path."""
  with tempfile.TemporaryDirectory() as profile:
    subprocess.run([chromium(), *CHROMIUM_FLAGS, '--user-data-dir=' + profile,
                    '--window-size=%d,%d' % (width, height),
                    '--screenshot=' + str(png_path), 'file://' + str(html_path)],
                   check=True, capture_output=True, timeout=120)
  return png_path
