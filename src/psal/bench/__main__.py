"""``python -m psal.bench <suite> [options]``; suites: knn, sparse, attention, apps, photos, training, gpu, kernels, profile, video, colour-video."""

from __future__ import annotations

import sys

SUITES = {
    "knn": "psal.bench.knn",
    "sparse": "psal.bench.sparse",
    "attention": "psal.bench.attention",
    "apps": "psal.bench.apps",
    "photos": "psal.bench.photos",
    "training": "psal.bench.training",
    "gpu": "psal.bench.gpu",
    "kernels": "psal.bench.kernels",
    "profile": "psal.bench.profile",
    "video": "psal.bench.video",
    "colour-video": "psal.bench.colour_video",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUITES:
        print(f"usage: python -m psal.bench {{{','.join(SUITES)}}} [options]  (add --help after a suite)", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(SUITES[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
