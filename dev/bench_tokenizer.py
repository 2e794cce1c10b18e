#!/usr/bin/env python3
"""bench_tokenizer.py: encode speed of Hugging Face `tokenizers` on text files, for dev/bench_tokenizer.sh.

    RAYON_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false python3 dev/bench_tokenizer.py --tokenizer T.json FILE...

Encodes each file as one string (as the reference tokenizations in shared/data/tokenizer/reference were made),
`--repeats` times, and prints the load time, the best and the median time of a repeat, and one `RESULT` line in
the format of `./prepare --bench`. Single-threaded: Tokenizer.encode of one string does not use the thread pool,
and the environment variables above keep it that way.
"""
import argparse
import os
import statistics
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    if os.environ.get("RAYON_NUM_THREADS") != "1" or os.environ.get("TOKENIZERS_PARALLELISM") != "false":
        sys.exit("bench_tokenizer.py: set RAYON_NUM_THREADS=1 and TOKENIZERS_PARALLELISM=false (single-thread run)")

    import tokenizers  # imported here so that --help works without the package

    start = time.perf_counter()
    tokenizer = tokenizers.Tokenizer.from_file(args.tokenizer)
    load_s = time.perf_counter() - start
    print("tokenizer: %s loaded in %.3f s (HF tokenizers %s)" % (args.tokenizer, load_s, tokenizers.__version__))

    texts = []
    for path in args.files:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": no line-end translation
            texts.append(f.read())
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)

    seconds, tokens = [], 0
    for _ in range(args.repeats):
        tokens = 0
        start = time.perf_counter()
        for text in texts:
            tokens += len(tokenizer.encode(text))
        seconds.append(time.perf_counter() - start)
    best, median = min(seconds), statistics.median_low(seconds)
    print("encoded %d files, %d bytes -> %d tokens; %d repeats, single thread"
          % (len(texts), total_bytes, tokens, args.repeats))
    print("best %.4f s = %.2f MB/s, median %.4f s = %.2f MB/s"
          % (best, total_bytes / best / 1e6, median, total_bytes / median / 1e6))
    print("RESULT impl=hf-tokenizers-%s load_s=%.4f bytes=%d tokens=%d best_s=%.4f median_s=%.4f"
          % (tokenizers.__version__, load_s, total_bytes, tokens, best, median))


if __name__ == "__main__":
    main()
