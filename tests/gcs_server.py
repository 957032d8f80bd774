"""A real GCS JSON API server on loopback for the gs:// tests and CI: `gcp-storage-emulator`.

`python tests/gcs_server.py --port=PORT` serves until killed (`.ci/run` starts one); the tests'
`gcs_server` fixture (tests/conftest.py) uses the one `$JRECIPE_TEST_GCS_PORT` names, or starts its own.

The emulator ignores GCS's generation preconditions and sends no generation with an object's
bytes. Both matter here: jrecipe's work-directory lock is an object created only if absent
(`ifGenerationMatch=0`), and tensorstore updates an OCDBT checkpoint's manifest by
compare-and-swap (it reads the generation from `x-goog-generation`, then writes with
`ifGenerationMatch`); without them a lost race overwrites silently, or tensorstore fails with
"Malformed StorageGeneration". So `serve` adds both, as GCS documents them, to the emulator's
upload, download and delete handlers. The server is single-threaded: a check and its write
are atomic.
"""

import argparse
import os
import socket
import threading
from http import HTTPStatus

# The variables a client needs to reach the emulator instead of Google (docs/cloud.md).
def client_env(port: int) -> dict:
  url = f"http://127.0.0.1:{port}"
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # ArrayRecord's reader (google-cloud-cpp)
          "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
          "GOOGLE_CLOUD_PROJECT": "jrecipe-test", "NO_GCE_CHECK": "true"}


def _object_name(request) -> str | None:
  if "object_id" in request.params:
    return request.params["object_id"]
  if "name" in request.query:
    return request.query["name"][0]
  data = request.data
  if isinstance(data, dict):
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else data
    return meta.get("name")
  return None


def _generation(request, storage) -> str | None:
  """The object's current generation ('0' when it does not exist, GCS's convention)."""
  from gcp_storage_emulator.exceptions import NotFound
  name = _object_name(request)
  if name is None:
    return None
  try:
    return str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
  except NotFound:
    return "0"


def _failed_precondition(request, storage):
  """The status GCS answers a request whose generation preconditions do not hold, or None:
  412 when `ifGenerationMatch` differs from the object's generation, 304 (reads) or 412
  when `ifGenerationNotMatch` equals it."""
  match = request.query.get("ifGenerationMatch", [None])[0]
  not_match = request.query.get("ifGenerationNotMatch", [None])[0]
  if match is None and not_match is None:
    return None
  current = _generation(request, storage)
  if current is None:
    return None
  if match is not None and match != current:
    return HTTPStatus.PRECONDITION_FAILED
  if not_match is not None and not_match == current:
    return HTTPStatus.NOT_MODIFIED if request.method == "GET" else HTTPStatus.PRECONDITION_FAILED
  return None


def _checked(handler, name):
  """`handler` with GCS's generation preconditions, and, for a download, the generation
  headers GCS sends with an object's bytes (`x-goog-generation`, `x-goog-metageneration`)."""

  def run(request, response, storage, *args, **kwargs):
    status = _failed_precondition(request, storage)
    if status is not None:
      response.status = status
      if status == HTTPStatus.PRECONDITION_FAILED:
        response.json({"error": {"code": 412, "message": "conditionNotMet"}})
      return None
    out = handler(request, response, storage, *args, **kwargs)
    if name == "download" and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])
    return out

  run._jrecipe_checked = True
  return run


def _patch_handlers() -> None:
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects
  if getattr(objects.insert, "_jrecipe_checked", False):
    return
  for name in ("insert", "download", "delete"):
    original = getattr(objects, name)
    checked = _checked(original, name)
    for _, handlers in server.HANDLERS:
      for method, fn in list(handlers.items()):
        if fn is original:
          handlers[method] = checked
    # The module's own references: the upload fallback and `get` (`alt=media` downloads).
    setattr(objects, name, checked)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def create_bucket(port: int, name: str) -> None:
  """Creates a bucket through the GCS JSON API (google-cloud-storage's client)."""
  from google.auth.credentials import AnonymousCredentials
  from google.cloud import storage
  client = storage.Client(project="jrecipe-test", credentials=AnonymousCredentials(),
                          client_options={"api_endpoint": f"http://127.0.0.1:{port}"})
  client.create_bucket(name)


def serve(port: int, bucket: str = "jrecipe-test"):
  """Starts the server in this process (a background thread); returns it (`.stop()`)."""
  import logging
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
  from gcp_storage_emulator.server import create_server
  _patch_handlers()
  srv = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  srv.start()
  return srv


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--port", type=int, default=9023)
  parser.add_argument("--bucket", default="jrecipe-test")
  args = parser.parse_args()
  serve(args.port, args.bucket)
  print(f"GCS emulator on http://127.0.0.1:{args.port}, bucket {args.bucket}", flush=True)
  threading.Event().wait()


if __name__ == "__main__":
  os.environ.setdefault("PYTHONUNBUFFERED", "1")
  main()
