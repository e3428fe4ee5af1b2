"""Library versions: the pins launcher and workers must share, and what a run records."""

import platform

# Launcher and Dataflow workers must run the same Beam (the job graph's format), and the
# same TensorFlow and protobuf (SavedModel and TFRecord parsing). setup.py, the
# requirements file and the Dockerfile all take their pins from here.
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


def runtime_versions():
  """Versions of what actually ran, for the manifest."""
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  versions = {'python': platform.python_version()}
  for distribution in ('apache-beam', 'tensorflow', 'protobuf', 'pyarrow', 'numpy',
                       'pillow', 'faiss-cpu', 'ai-edge-litert'):
    try:
      versions[distribution] = metadata.version(distribution)
    except metadata.PackageNotFoundError:
      versions[distribution] = None
  return versions
