"""The seed models and the --model flag's grammar: NAME, or NAME=HANDLE[#TENSOR]."""

import re

from schemas import outputs
from transforms.models import ModelSpec

DEFAULT_MODEL = 'mobilenet_v3_small_100_224'

# name -> (TF Hub handle, input (height, width), feature dimension)
SEED_MODELS = {
    'mobilenet_v1_050_160': (
        'https://tfhub.dev/google/imagenet/mobilenet_v1_050_160/feature_vector/3',
        (160, 160), 512),
    'mobilenet_v2_130_224': (
        'https://tfhub.dev/google/imagenet/mobilenet_v2_130_224/feature_vector/4',
        (224, 224), 1664),
    'mobilenet_v3_small_100_224': (
        'https://tfhub.dev/google/imagenet/mobilenet_v3_small_100_224/feature_vector/5',
        (224, 224), 1024),
}

# Model names become folder names under OUT/, so they are kept to a safe alphabet.
_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$')


class ModelSpecError(ValueError):
  """A --model value that cannot be understood."""


def parse_model_spec(text):
  """'NAME' or 'NAME=HANDLE[#TENSOR]' -> ModelSpec (not yet probed)."""
  text = text.strip()
  name, has_handle, handle = text.partition('=')
  name = name.strip()
  if not has_handle:
    if '/' in name or '://' in name or name.endswith('.tflite'):
      # A handle given alone: the model needs a name for its output folder.
      raise ModelSpecError(
          '--model %s: give the model a name for its output folder, as NAME=HANDLE '
          '(for example --model mine=%s)' % (name, name))
    if name not in SEED_MODELS:
      raise ModelSpecError(
          'unknown model %r: use one of %s, or NAME=HANDLE with a hub URL, a SavedModel '
          'directory or a .tflite file' % (name, ', '.join(sorted(SEED_MODELS))))
    handle = SEED_MODELS[name][0]
  if not _NAME.match(name):
    raise ModelSpecError('model name %r: use letters, digits, "_", "-" or "." '
                         '(it names the output folder)' % name)
  if name in outputs.RUN_LEVEL_NAMES or name.endswith(outputs.TEMPORARY_SUFFIX):
    raise ModelSpecError('model name %r is the name of a file or folder the run writes '
                         'beside the model folders (%s); choose another' % (
                             name, ', '.join(outputs.RUN_LEVEL_NAMES[:3])))
  handle, has_tensor, tensor = handle.strip().partition('#')
  if not handle:
    raise ModelSpecError('model %r has an empty handle after "="' % name)
  if has_tensor and not tensor:
    raise ModelSpecError('model %r has an empty tensor name after "#" (leave out the "#" '
                         'for the model\'s own output)' % name)
  # A seed model's name fixes its input size, even when its weights come from elsewhere.
  input_size = SEED_MODELS[name][1] if name in SEED_MODELS else None
  return ModelSpec(name=name, handle=handle, tensor=tensor or None, input_size=input_size)


def parse_model_specs(texts):
  specs = [parse_model_spec(t) for t in (texts or [DEFAULT_MODEL])]
  names = [s.name for s in specs]
  duplicated = sorted({n for n in names if names.count(n) > 1})
  if duplicated:
    raise ModelSpecError('model name used twice: %s' % ', '.join(duplicated))
  return specs
