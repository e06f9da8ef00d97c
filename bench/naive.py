"""The naive way, as the Gemini cookbook shows it (quickstarts/Batch_mode.ipynb), for comparison.

Sync SDK: upload the JSONL, create a batch job from it, poll `batches.get` every N s until done,
download the results into memory, `json.loads` each line, write the results out. Run as its own
process so its peak RSS is its own: `python -m bench.naive --base-url URL --file F --out O`;
prints one JSON line with its timings and `ru_maxrss`.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

COMPLETED = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--file", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="gemini-2.5-flash")
    ap.add_argument("--poll-seconds", type=float, default=1.0)
    args = ap.parse_args()

    from google import genai
    from google.genai import types

    client = genai.Client(
        api_key="bench-key",
        http_options=types.HttpOptions(base_url=args.base_url, api_version="v1beta"),
    )
    t: dict[str, float] = {"start": time.time()}
    uploaded = client.files.upload(
        file=args.file, config=types.UploadFileConfig(display_name="naive", mime_type="jsonl")
    )
    t["uploaded"] = time.time()
    job = client.batches.create(
        model=args.model, src=uploaded.name, config={"display_name": "naive-batch"}
    )
    t["created"] = time.time()
    while job.state is None or job.state.name not in COMPLETED:
        time.sleep(args.poll_seconds)
        job = client.batches.get(name=job.name)
    t["done"] = time.time()
    if job.state.name != "JOB_STATE_SUCCEEDED" or job.dest is None:
        print(json.dumps({"error": f"job ended {job.state.name}"}))
        return 1
    content = client.files.download(file=job.dest.file_name)
    t["downloaded"] = time.time()
    n = 0
    with open(args.out, "w") as f:
        for line in content.decode("utf-8").splitlines():
            result = json.loads(line)
            f.write(json.dumps(result) + "\n")
            n += 1
    t["end"] = time.time()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"times": t, "job": job.name, "lines": n, "maxrss": maxrss}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
