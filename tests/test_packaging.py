"""setup.py as --setup_file ships it: the sdist, installed without the source tree, runs."""

import hashlib
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import sysconfig

import pytest
from apache_beam.runners.portability.stager import Stager

from conftest import PROJECT
from pipeline.versions import requirements

DISTRIBUTION = 'beam-image-embeddings'


def run(argv, cwd, timeout=600):
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME')}
  result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  return result.stdout


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  """A fresh virtual environment holding only the sdist; returns its python."""
  work = tmp_path_factory.mktemp('packaging')
  # The same build that --setup_file triggers on the launcher.
  sdist = Stager._build_setup_package(  # pylint: disable=protected-access
      str(PROJECT / 'setup.py'), str(work))
  venv = work / 'venv'
  run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], cwd=work)
  python = venv / 'bin' / 'python'
  # The dependencies come from the test environment's site-packages, added as a plain
  # path: its .pth files (among them the editable install of this checkout) stay inert.
  # (--system-site-packages would reach the base interpreter's, which lacks Beam.)
  site_packages = run(
      [str(python), '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
      cwd=work).strip()
  pathlib.Path(site_packages, 'dependencies.pth').write_text(
      sysconfig.get_path('purelib') + '\n')
  run([str(python), '-m', 'pip', 'install', '--quiet', '--no-deps', '--no-index',
       '--no-build-isolation', '--ignore-installed', sdist], cwd=work)
  return python, pathlib.Path(site_packages), work


def test_modules_come_from_the_installed_sdist(installed):
  python, site_packages, work = installed
  printed = run([str(python), '-c', 'import json, pipeline.graph, transforms.embed, '
                 'schemas.outputs, views.html, run_pipeline, query_index; print(json.dumps('
                 '[m.__file__ for m in (pipeline.graph, transforms.embed, schemas.outputs, '
                 'views.html, run_pipeline, query_index)]))'], cwd=work)
  for module_file in json.loads(printed):
    assert pathlib.Path(module_file).is_relative_to(site_packages), module_file


def test_installed_requirements_are_the_pins(installed):
  python, _, work = installed
  printed = run([str(python), '-c', 'import json, importlib.metadata as m; '
                 'print(json.dumps(m.requires(%r)))' % DISTRIBUTION], cwd=work)
  installed_requirements = [r for r in json.loads(printed) if 'extra ==' not in r]
  assert sorted(installed_requirements) == sorted(requirements())


def test_installed_package_runs_the_job(installed, photo_tree, test_models):
  python, _, work = installed
  root, paths, _ = photo_tree
  out = work / 'out'
  # The default local run: worker processes started from the installed packages too.
  printed = run([str(python), '-m', 'run_pipeline', '--input', str(root / '**'),
                 '--output', str(out), '--model', 'v2=' + test_models['v2_tflite']], cwd=work)
  assert 'outputs in %s' % out in printed
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['counts']['read'] == len(paths) + 1
  assert manifest['counts']['models']['v2']['embedded'] == len(paths)
  assert manifest['counts']['reconciled'] is True
  assert manifest['versions']['apache-beam'] == importlib.metadata.version('apache-beam')


def fake_project(tmp_path):
  """The files scripts/ensure_venv.sh reads, and a `python3` on PATH that stands in for
  the (minutes-long) install: it makes .venv/bin/python, which logs what it is asked."""
  for name in ('scripts/ensure_venv.sh', 'setup.py', 'pipeline/versions.py'):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes((PROJECT / name).read_bytes())
  tools = tmp_path / 'tools'
  tools.mkdir()
  (tools / 'python3').write_text(
      '#!/bin/sh\nmkdir -p .venv/bin\n'
      'printf \'#!/bin/sh\\necho "$*" >> .venv/installs\\n\' > .venv/bin/python\n'
      'chmod +x .venv/bin/python\n')
  (tools / 'python3').chmod(0o755)
  fingerprint = hashlib.sha256(b''.join(
      (PROJECT / name).read_bytes() for name in ('setup.py', 'pipeline/versions.py'))
  ).hexdigest()[:16]
  return fingerprint, {**os.environ, 'PATH': '%s:%s' % (tools, os.environ['PATH'])}


def ensure_venv(project, env, *extra):
  return subprocess.run(['bash', str(project / 'scripts' / 'ensure_venv.sh'), *extra],
                        env=env, capture_output=True, text=True, check=True)


def test_run_after_tests_does_not_install_again(tmp_path):
  fingerprint, env = fake_project(tmp_path)
  ensure_venv(tmp_path, env, 'test')
  stamps = sorted(p.name for p in (tmp_path / '.venv').glob('.installed-*'))
  assert stamps == ['.installed-%s-test' % fingerprint]
  # The test install holds the plain one's packages: nothing to do.
  assert ensure_venv(tmp_path, env).stderr == ''
  assert ensure_venv(tmp_path, env, 'test').stderr == ''
  installs = (tmp_path / '.venv' / 'installs').read_text().splitlines()
  assert installs[-1] == '-m pip install --quiet --editable .[test]'


def test_changed_dependencies_install_again_and_keep_only_current_stamps(tmp_path):
  fingerprint, env = fake_project(tmp_path)
  ensure_venv(tmp_path, env)  # the plain install first, then the tests'
  result = ensure_venv(tmp_path, env, 'test')
  assert 'Setting up .venv' in result.stderr
  (tmp_path / '.venv' / '.installed-0123456789abcdef-test').touch()  # an older setup.py's
  assert ensure_venv(tmp_path, env).stderr == ''
  stamps = sorted(p.name for p in (tmp_path / '.venv').glob('.installed-*'))
  assert stamps == ['.installed-0123456789abcdef-test', '.installed-%s' % fingerprint,
                    '.installed-%s-test' % fingerprint]
  with open(tmp_path / 'setup.py', 'a') as setup:
    setup.write('# a new pin\n')
  result = ensure_venv(tmp_path, env)
  assert 'Setting up .venv' in result.stderr
  stamps = [p.name for p in (tmp_path / '.venv').glob('.installed-*')]
  assert len(stamps) == 1 and not stamps[0].endswith('-test')
  assert stamps[0] != '.installed-%s' % fingerprint
