"""The run summary printed at the end: the manifest's figures as a short text table."""

from pipeline.progress import format_duration
from pipeline.resume import CHANGED, MOVED, REMOVED, RESUMED
from schemas import outputs
from schemas.records import terminal_text

ALL_MODELS = 'all models'


def _table(header, rows, right_aligned):
  """Text columns; the columns numbered in right_aligned (numbers) are right-aligned."""
  widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
  lines = []
  for row in [header] + rows:
    cells = [str(cell).rjust(width) if i in right_aligned else str(cell).ljust(width)
             for i, (cell, width) in enumerate(zip(row, widths))]
    lines.append('  '.join(cells).rstrip())
  return lines


def failure_reason_text(entry):
  return '%s %s' % (entry['stage'], entry['error'])


# What a resumed run did with the earlier rows, as the manifest counts it per model.
_RESUMED_WORDS = ((CHANGED, 'changed since, read again'),
                  (REMOVED, 'rows of inputs gone, removed'),
                  (MOVED, 'found at a new place, uri updated'))


def _resume_lines(models):
  """A resumed run's line per model: how many inputs were up to date, and what it did
  with the other earlier rows."""
  lines = []
  for name, model in models.items():
    if RESUMED in model:
      done = ['%s up to date' % format(model[RESUMED], ',')] + [
          '%s %s' % (format(model[field], ','), words)
          for field, words in _RESUMED_WORDS if model.get(field)]
      lines.append('  resumed %s: %s' % (name, '; '.join(done)))
  return lines


def _repeated_key_lines(manifest):
  """A warning per model whose rows repeat keys (see transforms.index.repeated_keys)."""
  lines = []
  for model in manifest.get('models', []):
    index = model.get('index') or {}
    if index.get('repeated_key_rows'):
      lines.append(
          '  warning: %s: %s rows repeat the key of another (%s): a key should name one '
          'image, or queries by key and --resume cannot tell them apart; WebDataset '
          'shards that reuse sample keys belong in folders of their own' % (
              model['name'], format(index['repeated_key_rows'], ','),
              terminal_text(', '.join(index['repeated_key_examples']))))
  return lines


def format_summary(manifest, out_dir, with_report=True):
  """The manifest -> the lines printed when the run ends: per model images embedded,
  failures and throughput; failures by reason with a count and an example; wall time;
  where the outputs are."""
  counts = manifest['counts']
  timing = manifest.get('throughput') or {}
  per_model_rate = timing.get('models', {})
  rows = [[name, format(model['embedded'], ','), format(model['failed'], ','),
           '%.1f' % per_model_rate[name] if name in per_model_rate else '-']
          for name, model in counts['models'].items()]
  lines = ['run summary'] + ['  ' + line for line in _table(
      ['model', 'embedded', 'failed', 'images/s'], rows, (1, 2, 3))]
  lines.extend(_resume_lines(counts['models']))
  lines.extend(_repeated_key_lines(manifest))
  if counts.get('unchanged_not_read'):
    lines.append('  %s inputs unchanged in size and time since: not read again' % format(
        counts['unchanged_not_read'], ','))
  reasons = manifest.get('failures_by_reason') or []
  if reasons:
    lines.append('failures by reason')
    reason_rows = []
    for entry in reasons:
      example = entry['examples'][0] if entry['examples'] else {}
      reason_rows.append([format(entry['count'], ','), failure_reason_text(entry),
                          entry['model'] or ALL_MODELS,
                          terminal_text('%s: %s' % (example.get('key', ''),
                                                    example.get('message', '')))])
    lines.extend('  ' + line for line in _table(
        ['count', 'reason', 'model', 'first example'], reason_rows, (0,)))
  else:
    lines.append('failures: none')
  if timing:
    lines.append('%s images read in %s (%.1f images/s)' % (
        format(counts['read'], ','), format_duration(timing['wall_seconds']),
        timing['images_per_second']))
  lines.append('outputs in %s:' % out_dir)
  where = [outputs.MANIFEST_FILE] + ([outputs.REPORT_FILE] if with_report else []) + [
      outputs.FAILURES_DIR + '/'] + [
               '%s/  (%s/, %s)' % (name, outputs.EMBEDDINGS_DIR, outputs.INDEX_FILE
                                   if figures['embedded'] else 'no index: nothing embedded')
               for name, figures in counts['models'].items()]
  lines.extend('  ' + item for item in where)
  return '\n'.join(lines)
