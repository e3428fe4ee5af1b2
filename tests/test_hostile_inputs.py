"""Hostile inputs: keys, WebDataset member names and TFRecord filenames that look like paths
are data only; nothing is written outside the output; nothing from the inputs runs."""

import json
import os
import pathlib
import re

import pyarrow.parquet as pq
import pytest

import imagegen
import query_index
import run_pipeline
from conftest import IN_PROCESS, PROJECT
from test_read import example, write_tar, write_tfrecord
from views import html

HOSTILE_MEMBERS = ['../../escape_tar.jpg', '/tmp/absolute_escape_%d.jpg' % os.getpid(),
                   'a/../../../escape_nested.jpg', '<img src=x onerror=alert(1)>.jpg']
HOSTILE_FILENAMES = ['../../escape_tfrecord.jpg', '/tmp/absolute_tfrecord_%d.jpg' % os.getpid()]


def _tree(root):
  return {str(p.relative_to(root)) for p in root.rglob('*')}


@pytest.fixture(scope='module')
def hostile_run(tmp_path_factory, test_models):
  base = tmp_path_factory.mktemp('hostile')
  inputs = base / 'deep' / 'inputs'
  inputs.mkdir(parents=True)
  write_tar(inputs / '00000.tar', [
      member for n, name in enumerate(HOSTILE_MEMBERS)
      for member in ((name, imagegen.encode(imagegen.photo(40 + n, 64, 48))),
                     (name[:-len('jpg')] + 'json', b'{"url": "../../x"}'))])
  write_tfrecord(inputs / 'train.tfrecord',
                 [example(imagegen.encode(imagegen.photo(50 + n, 64, 48)), name)
                  for n, name in enumerate(HOSTILE_FILENAMES)])
  before = _tree(base)
  out = base / 'deep' / 'out'
  run_pipeline.main(['--input', str(inputs / '*'), '--output', str(out),
                     '--model', 'v1=' + test_models['v1_tf1'], *IN_PROCESS])
  return base, out, before


def test_nothing_is_written_outside_the_output(hostile_run):
  base, out, before = hostile_run
  created = _tree(base) - before
  outside = [p for p in created if not (base / p).resolve().is_relative_to(out.resolve())
             and (base / p) != out]
  assert not outside
  for name in HOSTILE_MEMBERS + HOSTILE_FILENAMES:
    stem = pathlib.PurePosixPath(name).name.split('.')[0]
    for folder in (base, base / 'deep', pathlib.Path('/tmp'), PROJECT, PROJECT.parent):
      assert not list(folder.glob(stem + '*')), (folder, stem)


def test_hostile_names_are_kept_as_keys_and_metadata(hostile_run):
  _, out, _ = hostile_run
  rows = {r['key']: r for r in pq.read_table(str(out / 'v1' / 'embeddings')).to_pylist()}
  expected_keys = [name[:-len('.jpg')] for name in HOSTILE_MEMBERS] + [
      'train.tfrecord#0', 'train.tfrecord#1']
  assert sorted(rows) == sorted(expected_keys)
  assert json.loads(rows['train.tfrecord#0']['metadata']) == {
      'image/filename': HOSTILE_FILENAMES[0]}
  # A key that looks like a path is looked up as a key, not opened as a file.
  result = query_index.run_queries(str(out), 'v1', keys=['../../escape_tar'], k=1)
  assert result[0]['neighbors'][0]['key'] == '../../escape_tar'


def test_hostile_keys_are_inert_in_html(hostile_run):
  _, out, _ = hostile_run
  keys = pq.read_table(str(out / 'v1' / 'embeddings')).column('key').to_pylist()
  markup = html.figure(None, keys)
  assert '<img src=x' not in markup and '&lt;img src=x onerror=alert(1)&gt;' in markup


def test_nothing_from_inputs_or_indexes_is_unpickled_or_executed():
  """The readers of inputs and outputs are Pillow (an allow-list of formats), the TFRecord
  and tar parsers, pyarrow, json and faiss.deserialize_index; this guards against a
  pickle, eval or external program creeping in."""
  forbidden = re.compile(r'\b(pickle|cPickle|dill|marshal|shelve|eval|exec|yaml\.load|'
                         r'allow_pickle|np\.load|numpy\.load|os\.system|subprocess|popen)\b')
  offenders = []
  for folder in ('pipeline', 'transforms', 'schemas', 'views'):
    for path in sorted((PROJECT / folder).glob('*.py')):
      for number, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split('#', 1)[0]
        if forbidden.search(code):
          offenders.append('%s:%d: %s' % (path.relative_to(PROJECT), number, line.strip()))
  for script in ('run_pipeline.py', 'query_index.py'):
    for number, line in enumerate((PROJECT / script).read_text().splitlines(), 1):
      if forbidden.search(line.split('#', 1)[0]):
        offenders.append('%s:%d: %s' % (script, number, line.strip()))
  assert not offenders
