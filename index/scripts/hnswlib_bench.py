"""hnswlib side of the index benchmark: same vectors, queries and ground truth as the Rust
side (files written by the bench binary). Prints one JSON line with build time, memory per
vector, reopen (load) time with the file evicted from the page cache and with it cached, and
per-ef QPS and recall@k."""

import argparse
import json
import os
import time

import hnswlib
import numpy as np


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


TIE = 1e-5


def correct(data, query, truth, returned):
    """Correct answers among one query's returned ids, counted as the Rust side does: an id
    counts when it is one of the true top k, or when its exact score (in f64) is within TIE of
    the lowest true top-k score, a tie the f32 ground truth may have broken either way."""
    q = query.astype(np.float64)
    lowest = (data[truth].astype(np.float64) @ q).min()
    scores = data[returned].astype(np.float64) @ q
    wanted = set(truth.tolist())
    return sum(1 for i, s in zip(returned.tolist(), scores) if i in wanted or s >= lowest - TIE)


def set_page_cache(path, warm):
    """Reads the file through the page cache, or flushes it and drops it from the cache."""
    with open(path, "rb") as f:
        if warm:
            while f.read(4 << 20):
                pass
        else:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed_load(path, dim, count):
    started = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=dim)
    index.load_index(path, max_elements=count)
    return time.perf_counter() - started, index


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--dim", type=int, required=True)
    parser.add_argument("--m", type=int, required=True)
    parser.add_argument("--efc", type=int, required=True)
    parser.add_argument("--efs", required=True)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--keep", action="store_true",
                        help="keep the saved index, and load it instead of building when present")
    args = parser.parse_args()

    data = np.fromfile(os.path.join(args.dir, "vectors.f32"), dtype="<f4").reshape(-1, args.dim)
    queries = np.fromfile(os.path.join(args.dir, "queries.f32"), dtype="<f4").reshape(-1, args.dim)
    truth = np.fromfile(os.path.join(args.dir, "truth.u32"), dtype="<u4").reshape(-1, args.k)
    threads = os.cpu_count() or 1

    path = os.path.join(args.dir, "hnswlib.bin")
    build_s = None
    rss_before = rss_bytes()
    if not (args.keep and os.path.exists(path)):
        index = hnswlib.Index(space="ip", dim=args.dim)
        index.init_index(max_elements=len(data), ef_construction=args.efc, M=args.m)
        started = time.perf_counter()
        index.add_items(data, np.arange(len(data)), num_threads=threads)
        build_s = time.perf_counter() - started
        index.save_index(path)
        del index

    set_page_cache(path, warm=False)
    cold_reopen_s, index = timed_load(path, args.dim, len(data))
    del index
    set_page_cache(path, warm=True)
    reopen_s, index = timed_load(path, args.dim, len(data))
    rss_per_vector = (rss_bytes() - rss_before) / len(data)
    if not args.keep:
        os.remove(path)

    runs = []
    for ef in [int(e) for e in args.efs.split(",")]:
        index.set_ef(ef)
        started = time.perf_counter()
        labels, _ = index.knn_query(queries, k=args.k, num_threads=1)
        seconds = time.perf_counter() - started
        hits = sum(correct(data, q, t, l) for q, t, l in zip(queries, truth, labels))
        runs.append({"ef": ef, "qps": len(queries) / seconds, "recall": hits / truth.size})

    print(json.dumps({
        "build_s": build_s,
        "rss_per_vector": rss_per_vector,
        "reopen_s": reopen_s,
        "cold_reopen_s": cold_reopen_s,
        "runs": runs,
    }))


if __name__ == "__main__":
    main()
