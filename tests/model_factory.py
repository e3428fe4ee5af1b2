"""Small test models with the seed models' real architectures and interfaces, random weights.

TF Hub cannot be reached here, so the tests build what it would serve: a TF2 SavedModel
(callable, mobilenet_v3_small_100_224's 1024-d features), a TF1 Hub-format module
(empty tag set, `image_feature_vector` signature; mobilenet_v1_050_160's 512-d
features) and a TFLite model (mobilenet_v2_130_224's 1664-d features).
"""

import os

import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import keras  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position


def calibration_images(count=8, size=224, seed=0):
  """Smooth random colour fields: varied enough to give BatchNorm healthy statistics."""
  rng = np.random.default_rng(seed)
  low = rng.random((count, 7, 7, 3)).astype(np.float32)
  return tf.image.resize(low, (size, size), method='bicubic').numpy().clip(0, 1)


def calibrate_batchnorm(model, images):
  """Random-weight Keras MobileNets give near-zero, all-alike embeddings; one forward pass
  in training mode with momentum 0 sets BatchNorm statistics from real activations."""
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.momentum = 0.0
  model(images, training=True)
  return model


class _Features(tf.Module):
  """Hub-style callable: float32 RGB in [0, 1], NHWC -> [batch, features]."""

  def __init__(self, model, size):
    super().__init__()
    self.model = model
    self.__call__ = tf.function(
        lambda images: model(images * 2.0 - 1.0, training=False),
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])


def v3_small_features():
  keras.utils.set_random_seed(0)  # the same weights on every build
  base = keras.applications.MobileNetV3Small(
      input_shape=(224, 224, 3), weights=None, include_top=True, classes=1001,
      include_preprocessing=False)
  # The hub feature vector is the 1024-d output of the head's conv_2 (after hard-swish).
  head = base.get_layer('conv_2')
  after_head = base.layers[base.layers.index(head) + 1]
  model = keras.Model(base.input, keras.layers.Flatten()(after_head.output))
  return calibrate_batchnorm(model, calibration_images(size=224) * 2 - 1)


def v1_050_160_features():
  keras.utils.set_random_seed(0)  # the same weights on every build
  model = keras.applications.MobileNet(input_shape=(160, 160, 3), alpha=0.5, weights=None,
                                       include_top=False, pooling='avg')
  return calibrate_batchnorm(model, calibration_images(size=160) * 2 - 1)


def v2_130_224_features():
  keras.utils.set_random_seed(0)  # the same weights on every build
  model = keras.applications.MobileNetV2(input_shape=(224, 224, 3), alpha=1.3,
                                         weights=None, include_top=False, pooling='avg')
  return calibrate_batchnorm(model, calibration_images(size=224) * 2 - 1)


def save_tf2(model, size, path):
  tf.saved_model.save(_Features(model, size), path)
  return path


def save_tf1_hub(model, size, path):
  """A TF1 Hub-format SavedModel: one MetaGraph with an empty tag set whose
  `image_feature_vector` (and `default`) signature maps `images` to `default`. The
  weights are variables, stored in `variables/`, as in the modules TF Hub serves."""
  from tensorflow.python.framework.convert_to_constants import (  # pylint: disable=import-outside-toplevel
      convert_variables_to_constants_v2)
  function = tf.function(lambda images: model(images * 2.0 - 1.0, training=False))
  concrete = function.get_concrete_function(tf.TensorSpec([None, size, size, 3], tf.float32))
  # The Keras model's graph, with its weights as constants, rebuilt in a TF1 graph where
  # every weight array reads a variable instead.
  frozen = convert_variables_to_constants_v2(concrete)
  graph_def = frozen.graph.as_graph_def()
  weights = {}
  for node in graph_def.node:
    if (node.op == 'Const' and node.attr['dtype'].type == tf.float32.as_datatype_enum
        and node.attr['value'].tensor.tensor_shape.dim):
      weights[node.name] = tf.make_ndarray(node.attr['value'].tensor)
      # A placeholder in its place, fed the variable below: the graph keeps no copy.
      dtype = node.attr['dtype']
      node.op = 'Placeholder'
      node.ClearField('attr')
      node.attr['dtype'].CopyFrom(dtype)
  input_name = frozen.inputs[0].name
  output_name = frozen.outputs[0].name
  with tf.Graph().as_default() as graph:
    images = tf.compat.v1.placeholder(tf.float32, [None, size, size, 3], name='images')
    input_map = {input_name: images}
    variables = {}
    for index, (name, value) in enumerate(sorted(weights.items())):
      variables[name] = tf.compat.v1.get_variable(
          'weight_%d' % index, shape=value.shape, dtype=tf.float32,
          initializer=tf.compat.v1.zeros_initializer())  # values loaded below, not in the graph
      input_map[name + ':0'] = variables[name].value()
    features, = tf.compat.v1.import_graph_def(
        graph_def, input_map=input_map, return_elements=[output_name], name='module')
    with tf.compat.v1.Session(graph=graph) as session:
      session.run(tf.compat.v1.global_variables_initializer())
      for name, variable in variables.items():
        variable.load(weights[name], session)
      signature = tf.compat.v1.saved_model.signature_def_utils.predict_signature_def(
          inputs={'images': images}, outputs={'default': features})
      builder = tf.compat.v1.saved_model.Builder(path)
      builder.add_meta_graph_and_variables(
          session, tags=[], signature_def_map={'image_feature_vector': signature,
                                               'default': signature})
      builder.save()
  return path


def save_tflite(model, size, path):
  """A float TFLite model taking [0, 1] input, with a free batch dimension."""
  inputs = keras.Input((size, size, 3))
  wrapped = keras.Model(inputs, model(keras.layers.Rescaling(2.0, offset=-1.0)(inputs)))
  with open(path, 'wb') as f:
    f.write(tf.lite.TFLiteConverter.from_keras_model(wrapped).convert())
  return path


def save_tflite_classifier(path, size=32, channels=12, classes=10):
  """A small float TFLite image classifier ending as MobileNets do: convolution, global
  average pooling (the features, `channels` of them), dense layer, softmax."""
  keras.utils.set_random_seed(0)
  inputs = keras.Input((size, size, 3))
  features = keras.layers.GlobalAveragePooling2D(name='features')(
      keras.layers.Conv2D(channels, 3, activation='relu')(inputs))
  outputs = keras.layers.Dense(classes, activation='softmax')(features)
  with open(path, 'wb') as f:
    f.write(tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, outputs)).convert())
  return path


class _Projection(tf.Module):
  """The smallest model with a seed model's interface: mean colour, projected."""

  def __init__(self, dim, size, seed):
    super().__init__()
    weights = np.random.default_rng(seed).standard_normal((3, dim)).astype(np.float32)
    self.weights = tf.Variable(weights)
    self.__call__ = tf.function(
        lambda images: tf.reduce_mean(images, axis=[1, 2]) @ self.weights,
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])


def save_projection(dim, size, path, seed=0):
  """A TF2 SavedModel of `dim` features that is not a MobileNet: another model with the
  same shape, as when a model's files are replaced. Builds in a second."""
  tf.saved_model.save(_Projection(dim, size, seed), path)
  return path


class _DarkNaNProjection(tf.Module):
  """A model that gives NaN for nearly black images (the square root of a negative
  number), as an unstable model or a broken conversion may."""

  def __init__(self, dim, size):
    super().__init__()
    self.weights = tf.Variable(np.random.default_rng(0).standard_normal((3, dim)),
                               dtype=tf.float32)
    self.__call__ = tf.function(
        lambda images: tf.sqrt(tf.reduce_mean(images, axis=[1, 2]) - 0.1) @ self.weights,
        input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])


def save_dark_nan_projection(dim, size, path):
  tf.saved_model.save(_DarkNaNProjection(dim, size), path)
  return path


class _CountingProjection(tf.Module):
  """A model with state: each call adds the batch size to `calls`. Its variables cannot
  be made constants."""

  def __init__(self, dim, size):
    super().__init__()
    self.weights = tf.Variable(np.random.default_rng(0).standard_normal((3, dim)),
                               dtype=tf.float32)
    self.calls = tf.Variable(0.0)

    def call(images):
      self.calls.assign_add(tf.cast(tf.shape(images)[0], tf.float32))
      return tf.reduce_mean(images, axis=[1, 2]) @ self.weights

    self.__call__ = tf.function(
        call, input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])


def save_counting_projection(dim, size, path):
  tf.saved_model.save(_CountingProjection(dim, size), path)
  return path


def build_all(directory):
  """Builds the three test models under `directory`; returns {name: handle}."""
  os.makedirs(directory, exist_ok=True)
  return {
      'v3_tf2': save_tf2(v3_small_features(), 224, os.path.join(directory, 'v3_tf2')),
      'v1_tf1': save_tf1_hub(v1_050_160_features(), 160, os.path.join(directory, 'v1_tf1')),
      'v2_tflite': save_tflite(v2_130_224_features(), 224,
                               os.path.join(directory, 'v2.tflite')),
  }


def build_seed_models(directory):
  """The three seed models in their TF Hub formats (v1: TF1 Hub module, v2 and v3: TF2
  SavedModels), random weights; returns {seed name: handle}. For benchmarks."""
  os.makedirs(directory, exist_ok=True)
  return {
      'mobilenet_v1_050_160': save_tf1_hub(v1_050_160_features(), 160,
                                           os.path.join(directory, 'v1_050_160')),
      'mobilenet_v2_130_224': save_tf2(v2_130_224_features(), 224,
                                       os.path.join(directory, 'v2_130_224')),
      'mobilenet_v3_small_100_224': save_tf2(v3_small_features(), 224,
                                             os.path.join(directory, 'v3_small_100_224')),
  }


if __name__ == '__main__':
  import sys
  print(build_all(sys.argv[1]))
