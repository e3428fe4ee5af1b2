"""setup.py as --setup_file ships it: the sdist, installed without the source tree, runs."""

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
