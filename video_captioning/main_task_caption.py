"""Video captioning on MSR-VTT / MSVD through the MemBridge fusion: fine-tune the prefix LM, decode, score.

The published command line runs with only the launcher changed (run as a module; ``--expand_msrvtt_sentences`` is
accepted: captioning always trains on every reference)::

    torchrun --nproc_per_node 8 -m video_captioning.main_task_caption --do_train --num_thread_reader=4 \\
        --cross_config_path ./CLIP-modules --epochs=10 --batch_size=32 --n_display=50 \\
        --data_path ${DATA_PATH} --features_path ${DATA_PATH}/MSVD_Videos --warmup_proportion 0.2 \\
        --output_dir ${OUTPUT_PATH} --lr 5e-5 --max_words 32 --max_frames 12 --batch_size_val 32 \\
        --datatype msvd --expand_msrvtt_sentences --feature_framerate 1 --coef_lr 1e-3 --freeze_layer_num 0 \\
        --slice_framepos 2 --loose_type --linear_patch 2d --sim_header meanP --init_model ${Pretrained_Model}

MSR-VTT: ``--datatype msrvtt --data_path MSRVTT_data.json`` (test = video7010..video9999, all 20 references).
``--beam_size N`` (1 = greedy) and ``--length_penalty`` set the decoding. Every epoch is validated; the best CIDEr's
weights decode the test set (``captions_test.json``, ``eval_results.json``, ``best_model.safetensors``).
"""

from __future__ import annotations

from dataloaders.tokenizer import ClipTokenizer
from engine.builders import build_dataset, build_model
from engine.run import Job, cli, prepare_model, run_main
from video_captioning.metrics import CaptionScorer
from video_captioning.task import (
    SELECTION_METRIC,
    CaptionTask,
    build_caption_parser,
    caption_contrastive_weight,
    caption_dataset_key,
    caption_evaluators,
    validate_caption_flags,
)


def build(args, dist) -> Job:
    """CLIP + fusion from ``--init_model``, prefix-LM fine-tuning, decoding scored with pycocoevalcap."""
    model = prepare_model(args, build_model(args, with_fusion=True))
    size, tokenizer, scorer = model.encoder.clip.config.image_resolution, ClipTokenizer(), CaptionScorer()
    test, val = caption_evaluators(args, dist, size, tokenizer, scorer)
    key = caption_dataset_key(args.datatype)
    train_set = lambda: build_dataset(args, key, "train", size, tokenizer=tokenizer)  # noqa: E731
    task = CaptionTask(model, args.caption_targets, caption_contrastive_weight(args))
    return Job(task, train_set, test, val, SELECTION_METRIC if val else None, close=scorer.close)


def main(argv: list[str] | None = None) -> dict:
    return run_main(build_caption_parser(__doc__.split("\n\n")[0]), build, argv, check=validate_caption_flags)


if __name__ == "__main__":
    cli(main)
