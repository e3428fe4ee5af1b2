"""Launch-time model probes remembered by the model's files and the library versions."""

import hashlib
import json
import os
import tempfile

from apache_beam.io.filesystems import FileSystems

from pipeline.versions import runtime_versions
from transforms.models import hub_cache_target, is_hub_url, probe_models

CACHE_ENV = 'BEAM_IMAGE_EMBEDDINGS_CACHE'
# Bumped when what a probe finds, or how it is stored, changes.
FORMAT_VERSION = 3


def cache_dir():
  """Where probes are remembered: $BEAM_IMAGE_EMBEDDINGS_CACHE, else the user's cache
  folder (beside TF Hub's downloads)."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.environ.get(CACHE_ENV) or os.path.join(base, 'beam-image-embeddings')


def _local_files(path):
  if os.path.isfile(path):
    status = os.stat(path)
    return [('', status.st_size, status.st_mtime_ns)]
  files = []
  for folder, _, names in os.walk(path):
    for name in names:
      status = os.stat(os.path.join(folder, name))
      files.append((os.path.relpath(os.path.join(folder, name), path), status.st_size,
                    status.st_mtime_ns))
  return sorted(files) or None


def model_files(handle):
  """(path, size, modification time) of every file of a model handle; None when there
  is nothing to list yet (a hub model not downloaded, a missing path)."""
  if is_hub_url(handle):
    handle = hub_cache_target(handle)
    if not os.path.exists(os.path.join(handle, 'saved_model.pb')):
      return None
  if '://' not in handle:
    return _local_files(handle) if os.path.exists(handle) else None
  prefix = handle if handle.lower().endswith('.tflite') else handle.rstrip('/') + '/**'
  listed = FileSystems.match([prefix])[0].metadata_list
  return sorted((m.path, m.size_in_bytes, m.last_updated_in_seconds) for m in listed) or None


def probe_key(spec, versions):
  """A digest of everything a probe's result depends on (versions: runtime_versions()),
  or None when the model's files cannot be listed (then it is probed, and nothing is
  remembered)."""
  try:
    files = model_files(spec.handle)
  except Exception:  # pylint: disable=broad-except
    return None  # the probe will say what is wrong
  if files is None:
    return None
  material = {'format_version': FORMAT_VERSION, 'spec': list(spec), 'files': files,
              'versions': versions}
  return hashlib.sha256(json.dumps(material, sort_keys=True).encode('utf-8')).hexdigest()


def _entry_path(key):
  return os.path.join(cache_dir(), 'probes', key + '.json')


def _recall(key):
  try:
    with open(_entry_path(key), encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _remember(key, probed):
  try:
    folder = os.path.dirname(_entry_path(key))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile('w', dir=folder, suffix='.tmp', delete=False) as f:
      json.dump({'input_size': list(probed.input_size), 'dim': probed.dim,
                 'model_format': probed.model_format, 'response': list(probed.response),
                 'output_note': probed.output_note}, f)
    os.replace(f.name, _entry_path(key))
  except OSError:
    pass  # an unwritable cache only costs the next run its probe


def probe_models_remembered(specs, in_subprocess=False):
  """probe_models, except for models whose files and libraries are as they were when
  they last passed: those are not loaded again (about 3 s per launch)."""
  specs = list(specs)
  versions = runtime_versions()
  keys = [probe_key(spec, versions) for spec in specs]
  found = {}
  for number, (spec, key) in enumerate(zip(specs, keys)):
    entry = _recall(key) if key else None
    if entry:
      found[number] = spec._replace(input_size=tuple(entry['input_size']), dim=entry['dim'],
                                    model_format=entry['model_format'],
                                    response=tuple(entry['response']),
                                    output_note=entry['output_note'])
  missing = [number for number in range(len(specs)) if number not in found]
  if missing:
    for number, probed in zip(missing, probe_models([specs[n] for n in missing],
                                                    in_subprocess)):
      found[number] = probed
      # A hub model has files only once the probe downloaded it.
      key = keys[number] or probe_key(specs[number], versions)
      if key:
        _remember(key, probed)
  return [found[number] for number in range(len(specs))]
