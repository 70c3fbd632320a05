"""Build indexed TFRecord shards of video frames (DESIGN §3.2), or verify a build.

Published input (one folder of extracted frames per video, frames sorted by file name), raw records exactly as the
published code writes them (``path-00000.tfrecord`` ... and ``path.index`` in the output folder)::

    python frozen_tfrecord.py --input_dir extracted_frames --output_dir WebVid_TFRecord

Straight from video files (12 uniformly sampled frames each), in the order of the caption file, as JPEG records,
decoding in 8 processes::

    python frozen_tfrecord.py --video_dir webvid_videos --video_list frozen_train_labels.json \\
        --output_dir WebVid_TFRecord --encoding jpeg --num_workers 8

Small frames for small models (JPEG records only; raw records are the published 256 x 256 layout): squash frames to
64 x 64 instead of 256 x 256, which shrinks the shards and the per-item decode cost::

    python frozen_tfrecord.py --video_dir webvid_videos --output_dir WebVid_TFRecord_64 --encoding jpeg \\
        --frame_size 64

Check every record of a build (framing, both CRCs, decoding); the last printed line is a JSON summary and the exit
code is 1 when any record is bad::

    python frozen_tfrecord.py --verify WebVid_TFRecord/path.index

Running a build again on the same ``--output_dir`` resumes it: complete shards are kept, an interrupted trailing
shard is discarded and its videos redone, videos already indexed are skipped. Unreadable videos are skipped and
listed in ``{output_dir}/{prefix}.skipped.json``. A build ends by printing a JSON summary line. A second build into
a folder another build is writing to is refused. Bad input ends the run with one ``error: ...`` line (exit code 2).

The work is done by ``dataloaders.shard_build``; this script only parses the flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from dataloaders import shard_build
from dataloaders.errors import MemBridgeError
from dataloaders.tfrecord_format import DEFAULT_JPEG_QUALITY, ENCODINGS, RAW_FRAME_SIZE
from dataloaders.tfrecord_io import DEFAULT_EXAMPLES_PER_SHARD, DEFAULT_INDEX_PREFIX, verify_index

logger = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2  # the build could not start or go on (bad flags, missing input folder, bad video list or index)


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input_dir", help="folder of frame folders (one per video; jpg/png frames sorted by name)")
    source.add_argument("--video_dir", help="folder of video files (the file stem is the video id)")
    source.add_argument("--verify", metavar="INDEX", help="check every record of this index and print a JSON summary")
    parser.add_argument("--video_list", help="csv with a video_id column, or json list of ids / {'video_id'} objects")
    parser.add_argument("--output_dir", help="where the shards, the index and the skipped-video report go")
    parser.add_argument("--prefix", default=DEFAULT_INDEX_PREFIX, help="shard/index name prefix (path -> path.index)")
    parser.add_argument("--encoding", choices=ENCODINGS, default="raw", help="raw (published BGR arrays) or jpeg")
    parser.add_argument(
        "--num_frames", type=int, default=shard_build.DEFAULT_NUM_FRAMES, help="frames per video (--video_dir)"
    )
    parser.add_argument("--num_workers", type=int, default=1, help="decoding processes (the writer is one process)")
    parser.add_argument("--examples_per_shard", type=int, default=DEFAULT_EXAMPLES_PER_SHARD, help="records per shard")
    parser.add_argument(
        "--jpeg_quality", type=int, default=DEFAULT_JPEG_QUALITY, help="JPEG quality (1-100; PIL advises <= 95)"
    )
    parser.add_argument(
        "--frame_size",
        type=int,
        default=RAW_FRAME_SIZE,
        help=f"frames are squashed to N x N (default {RAW_FRAME_SIZE}, the published size; other sizes need "
        "--encoding jpeg)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Build or verify shards; return the exit code (1: --verify found a bad record, 2: unusable input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verify:
        summary = verify_index(args.verify)
        for error in summary["errors"]:
            logger.error("%s", error["error"])
        print(json.dumps(summary))
        return 1 if summary["errors"] else 0
    try:
        summary = shard_build.build_shards(shard_build.BuildOptions.from_namespace(args))
    except MemBridgeError as err:
        print("error: " + " ".join(str(err).splitlines()), file=sys.stderr)  # one line, whatever the message
        return EXIT_BAD_INPUT
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
