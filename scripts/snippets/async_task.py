import os
import time

from openai import OpenAI

# The async flow of README.md ("Async tasks"), run by scripts/test against `imagegate demo`:
# submit with "async": true, then poll GET /v1/tasks/{id} until it is done. The OpenAI SDK
# has no method for imagegate's task routes, so its generic post/get are used; any HTTP
# client works the same way.

client = OpenAI(
    base_url=os.environ["IMAGEGATE_BASE_URL"],
    api_key=os.environ.get("IMAGEGATE_API_KEY", "sk-demo"),
)

task = client.post(
    "/images/generations",
    cast_to=object,
    body={
        "model": "gemini-3.1-flash-image",
        "prompt": "A lighthouse on a cliff at dawn",
        "size": "1024x1024",
        "async": True,
    },
)
print(task["id"], task["status"])
while task["status"] in ("queued", "processing"):
    time.sleep(2)  # the Retry-After hint of pending tasks
    task = client.get(f"/tasks/{task['id']}", cast_to=object)
    print(task["status"], task["progress"])

if task["status"] == "failed":
    raise SystemExit(task["error"]["message"])
print(task["data"][0]["url"])

# ---------------------------------------------------------------------------------------
# ADDITION: checks that the finished task is usable like a sync answer.
# ---------------------------------------------------------------------------------------
import sys  # noqa: E402
import urllib.request  # noqa: E402

assert task["status"] == "completed" and task["progress"] == 100, task
assert isinstance(task["created"], int), "ImagesResponse fields at the top level"
with urllib.request.urlopen(task["data"][0]["url"], timeout=30) as r:
    assert r.read().startswith(b"\x89PNG\r\n\x1a\n"), "the url serves a PNG"
print("async_task.py: all checks passed", file=sys.stderr)
