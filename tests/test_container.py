"""The worker image's recipe (Dockerfile, build script) agrees with setup.py and the pins.

No Docker engine runs here: the image itself is not built. These checks cover what can
go wrong without one: the base image's versions, what is copied, the build arguments.
"""

import os
import re
import subprocess
import sys
from distutils.core import run_setup  # pylint: disable=deprecated-module

from conftest import PROJECT
from pipeline.versions import PINNED, beam_version, container_build_args, mismatched_pins


def dockerfile_lines():
  lines = (PROJECT / 'Dockerfile').read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.strip().startswith('#')]


def test_base_image_is_beams_sdk_image_of_the_build_args():
  lines = dockerfile_lines()
  # No defaults: a default version here would be a second copy of the pin.
  assert lines[:3] == ['ARG BEAM_VERSION', 'ARG PYTHON_VERSION',
                       'FROM apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION}']
  assert [l for l in lines if l.startswith('FROM ')] == [lines[2]]
  assert not [l for l in lines if l.startswith(('ENTRYPOINT', 'CMD'))]  # Beam's boot stays


def test_image_holds_everything_setup_py_installs():
  distribution = run_setup(str(PROJECT / 'setup.py'), stop_after='init')
  needed = set(distribution.packages) | {m + '.py' for m in distribution.py_modules}
  needed.add('setup.py')
  copied = set()
  for line in dockerfile_lines():
    if line.startswith('COPY '):
      copied.update(source.rstrip('/') for source in line.split()[1:-1])
  assert needed <= copied, needed - copied
  allowed = {l[1:].rstrip('/') for l in (PROJECT / '.dockerignore').read_text().splitlines()
             if l.startswith('!')}
  assert needed <= allowed, needed - allowed


def test_build_args_carry_the_pinned_beam_and_this_python():
  args = container_build_args()
  assert args == {'BEAM_VERSION': PINNED['apache-beam[gcp]'],
                  'PYTHON_VERSION': '%d.%d' % sys.version_info[:2]}
  assert beam_version() == PINNED['apache-beam[gcp]']


def test_build_script_passes_the_build_args(tmp_path):
  # A stand-in for the docker client, which is not installed here: it records its arguments.
  fake_bin = tmp_path / 'bin'
  fake_bin.mkdir()
  docker = fake_bin / 'docker'
  docker.write_text('#!/bin/sh\necho "$@" > "%s"\n' % (tmp_path / 'docker-args'))
  docker.chmod(0o755)
  env = dict(os.environ, PATH='%s%s%s' % (fake_bin, os.pathsep, os.environ['PATH']))
  subprocess.run([str(PROJECT / 'scripts' / 'build_container.sh'), 'registry/image:1'],
                 env=env, check=True, timeout=300, capture_output=True)
  recorded = (tmp_path / 'docker-args').read_text().split()
  assert recorded[0] == 'build' and recorded[-3:] == ['--tag', 'registry/image:1', str(PROJECT)]
  for name, value in container_build_args().items():
    assert '%s=%s' % (name, value) in recorded
    assert recorded[recorded.index('%s=%s' % (name, value)) - 1] == '--build-arg'


def test_usage_without_image_name():
  result = subprocess.run([str(PROJECT / 'scripts' / 'build_container.sh')],
                          capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 2 and 'usage:' in result.stderr


def test_version_check_names_each_mismatch():
  installed = dict((re.sub(r'\[.*\]', '', name), version) for name, version in PINNED.items())
  assert mismatched_pins(installed.get) == []
  installed['tensorflow'] = '2.20.0'
  del installed['protobuf']
  assert mismatched_pins(installed.get) == [
      'tensorflow is 2.20.0, the pin is %s' % PINNED['tensorflow'],
      'protobuf is not installed, the pin is %s' % PINNED['protobuf']]


def test_version_check_passes_in_this_environment():
  result = subprocess.run([sys.executable, '-m', 'pipeline.versions', 'check'], cwd=PROJECT,
                          capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr
