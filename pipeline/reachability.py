"""Launch-time check that Cloud Storage answers, so that an offline gs:// run stops in seconds."""

import sys

import requests

from transforms.models import scheme_of

# Without it, Beam first retries for credentials (about 20 s, with a traceback per try),
# then the storage client retries the first listing until its 120 s deadline.
ANSWER_SECONDS = 10


class UnreachableError(Exception):
  """Cloud Storage cannot be reached from this machine."""


def cloud_storage_endpoint():
  """The address the storage client sends its requests to: https://storage.googleapis.com,
  or what STORAGE_EMULATOR_HOST or API_ENDPOINT_OVERRIDE name."""
  from google.cloud import storage  # pylint: disable=import-outside-toplevel
  return storage.Client.create_anonymous_client().api_endpoint


def _root_cause(error):
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return error


def missing_credentials_note():
  """A note when this machine has no Google Cloud credentials, None when it has some."""
  import google.auth  # pylint: disable=import-outside-toplevel
  from google.auth.exceptions import DefaultCredentialsError  # pylint: disable=import-outside-toplevel
  try:
    google.auth.default()
    return None
  except DefaultCredentialsError:
    # Said first, because Beam then retries for them for about 20 s, logging a traceback
    # each time, before it goes on anonymously.
    return ('no Google Cloud credentials found: Beam retries for them for about 20 s, '
            'then reads Cloud Storage anonymously, which only public buckets allow; '
            '`gcloud auth application-default login` sets them up')


def check_cloud_storage_reachable(flagged_paths, prog, timeout=ANSWER_SECONDS):
  """Raises UnreachableError, in one line, when one of the (flag, path) pairs is a gs://
  path and Cloud Storage gives no HTTP answer at all. Any answer will do: credentials and
  permissions are the storage client's to judge (public buckets need none), but their
  absence is noted on stderr as `prog: note: ...`. The request goes as the client's
  would, through the proxy HTTPS_PROXY names if any."""
  remote = [(flag, path) for flag, path in flagged_paths if scheme_of(path) == 'gs']
  if not remote:
    return
  endpoint = cloud_storage_endpoint()
  try:
    requests.head(endpoint, timeout=timeout).close()
  except requests.RequestException as e:
    flag, path = remote[0]
    raise UnreachableError(
        'cannot reach Cloud Storage for %s %s (%s: %s); check the network connection, or '
        'set HTTPS_PROXY if it goes through a proxy' % (flag, path, endpoint,
                                                       _root_cause(e))) from e
  note = missing_credentials_note()
  if note:
    print('%s: note: %s' % (prog, note), file=sys.stderr, flush=True)
