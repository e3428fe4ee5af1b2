"""Library versions: the pins launcher and workers must share, and what a run records."""

import argparse
import platform
import sys

# Launcher and Dataflow workers must run the same Beam (the job graph's format), and the
# same TensorFlow and protobuf (SavedModel and TFRecord parsing). setup.py, the worker
# image (Dockerfile, through scripts/build_container.sh) and the README's
# `python -m pipeline.versions requirements` all take their pins from here.
PINNED = {
    'apache-beam[gcp]': '2.77.0',
    'tensorflow': '2.21.0',
    'protobuf': '6.33.6',
}
# Also needed, compatible across minor versions.
UNPINNED = ['pyarrow', 'numpy', 'pillow', 'faiss-cpu', 'ai-edge-litert']


def requirements():
  """pip requirement strings of the runtime dependencies."""
  return ['%s==%s' % item for item in PINNED.items()] + list(UNPINNED)


def beam_version():
  return PINNED['apache-beam[gcp]']


def container_build_args(python_version=None):
  """Docker build arguments of the worker image (see Dockerfile): Beam's SDK image must
  match the launcher's Beam and Python (major.minor) versions."""
  python_version = python_version or '%d.%d' % sys.version_info[:2]
  return {'BEAM_VERSION': beam_version(), 'PYTHON_VERSION': python_version}


def _distribution(requirement):
  return requirement.split('[')[0]


def mismatched_pins(installed_version):
  """Pinned distributions whose installed version differs, as readable lines;
  installed_version(name) returns a version string or None."""
  problems = []
  for requirement, pinned in PINNED.items():
    found = installed_version(_distribution(requirement))
    if found != pinned:
      problems.append('%s is %s, the pin is %s' % (_distribution(requirement),
                                                   found or 'not installed', pinned))
  return problems


def _installed_version(distribution):
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version(distribution)
  except metadata.PackageNotFoundError:
    return None


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m pipeline.versions',
      description='The pinned versions: print them for pip or docker, or check them.')
  parser.add_argument('what', choices=('requirements', 'docker-build-args', 'check'),
                      help='requirements: pip requirement lines; docker-build-args: '
                           '--build-arg flags for the Dockerfile; check: exit 1 unless '
                           'the installed versions equal the pins')
  args = parser.parse_args(argv)
  if args.what == 'requirements':
    print('\n'.join(requirements()))
  elif args.what == 'docker-build-args':
    print(' '.join('--build-arg %s=%s' % item for item in container_build_args().items()))
  else:
    problems = mismatched_pins(_installed_version)
    for problem in problems:
      print('version mismatch: %s' % problem, file=sys.stderr)
    return 1 if problems else 0
  return 0


def runtime_versions():
  """Versions of what actually ran, for the manifest."""
  versions = {'python': platform.python_version()}
  for distribution in ('apache-beam', 'tensorflow', 'protobuf', 'pyarrow', 'numpy',
                       'pillow', 'faiss-cpu', 'ai-edge-litert'):
    versions[distribution] = _installed_version(distribution)
  return versions

if __name__ == '__main__':
  sys.exit(main())
