import os

from openai import OpenAI

# The seed provider's Python snippet, run unchanged against imagegate except for base_url
# and api_key (env IMAGEGATE_BASE_URL, e.g. http://127.0.0.1:8080/v1, and IMAGEGATE_API_KEY,
# default: the demo key sk-demo). Run by scripts/test against `imagegate demo`.

client = OpenAI(
    base_url=os.environ["IMAGEGATE_BASE_URL"],
    api_key=os.environ.get("IMAGEGATE_API_KEY", "sk-demo")
)

response = client.images.generate(
    model="gemini-3.1-flash-image",
    prompt="A cozy coffee shop interior with warm lighting and bookshelves",
    size="1024x1024",
    n=1
)

print(response.data[0].url)

# ---------------------------------------------------------------------------------------
# ADDITION (not part of the seed snippet): checks that what the snippet got is usable.
# Any failure raises, so the script exits non-zero.
# ---------------------------------------------------------------------------------------
import base64  # noqa: E402
import sys  # noqa: E402
import urllib.request  # noqa: E402

import openai  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check(condition, what):
    if not condition:
        raise AssertionError(what)
    print(f"  ok: {what}")


print(f"checks (openai-python {openai.__version__}):")

check(len(response.data) == 1, "n=1 gives exactly one image")
url = response.data[0].url
check(isinstance(url, str) and url.startswith(("http://", "https://")), f"url is http(s): {url!r}")
with urllib.request.urlopen(url, timeout=30) as r:
    body = r.read()
check(body.startswith(PNG_SIGNATURE), f"the url serves a PNG ({len(body)} bytes)")

b64 = client.images.generate(
    model="gemini-3.1-flash-image",
    prompt="A cozy coffee shop interior with warm lighting and bookshelves",
    size="1024x1024",
    n=1,
    response_format="b64_json",
)
check(len(b64.data) == 1 and b64.data[0].b64_json, "response_format=b64_json gives b64_json")
png = base64.b64decode(b64.data[0].b64_json, validate=True)
check(png.startswith(PNG_SIGNATURE), f"b64_json decodes to a PNG ({len(png)} bytes)")

models = [m.id for m in client.models.list()]
check("gemini-3.1-flash-image" in models, f"models.list() lists the model: {models}")

for bad in ({"n": 0}, {"size": "123x456"}):
    try:
        client.images.generate(
            model="gemini-3.1-flash-image",
            prompt="A cozy coffee shop interior with warm lighting and bookshelves",
            **{"size": "1024x1024", "n": 1, **bad},
        )
    except openai.BadRequestError as e:
        check(e.status_code == 400, f"{bad} raises BadRequestError with status 400: {e.message}")
    else:
        raise AssertionError(f"{bad} was accepted; expected openai.BadRequestError")

print("seed.py: all checks passed", file=sys.stderr)
