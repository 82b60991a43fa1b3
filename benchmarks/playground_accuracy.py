"""How often the prompt playground's default checkpoint ranks the right class first.

Four visually distinct classes: normal, cataract, glaucoma (single-label images of
synth-odir) and proliferative DR (grade 4 of synth-aptos), in-domain test split only
(training cameras, unseen patients). Prompts are the playground's defaults for these
classes (``widgets.format_prompts`` of the knowledge base's prompts, three per class, read
back through ``widgets.parse_prompts``); an image counts when its class has the highest
image-prompt similarity, which is what the playground's probability bar ranks first.

    python benchmarks/playground_accuracy.py --run-dir runs/default-... [--preset default]
    python benchmarks/playground_accuracy.py --checkpoint runs/.../pretrain/ours/seed0/checkpoint-last

Prints the share overall and per class, with the counts; never trains on the test split.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

# (class shown, dataset, knowledge key, how a record qualifies)
CLASSES = (
    ("normal", "synth-odir", "normal"),
    ("cataract", "synth-odir", "cataract"),
    ("glaucoma", "synth-odir", "glaucoma"),
    ("proliferative DR", "synth-aptos", "dr_grade_4"),
)


def default_prompts() -> dict[str, list[str]]:
    """The playground's default prompt text for the four classes, parsed as the widget parses it."""
    from fundus_lab import knowledge
    from fundus_lab.widgets import format_prompts, parse_prompts

    lists = [knowledge.class_prompts(key) for _, _, key in CLASSES]
    parsed = parse_prompts(format_prompts(lists))
    return dict(zip([name for name, _, _ in CLASSES], parsed.values()))


def test_images(open_dataset) -> tuple[list, np.ndarray]:
    """In-domain test images of the four classes (single-label ones for the multilabel set)."""
    images, labels = [], []
    for target, (name, dataset, key) in enumerate(CLASSES):
        ds = open_dataset(dataset)
        keys = [c.key for c in ds.manifest.classes]
        col = keys.index(key)
        for i, r in enumerate(ds.records):
            y = np.asarray(r.label)
            multi_hot = y.size > 1
            hit = (y.sum() == 1 and y[col] == 1) if multi_hot else int(y) == col
            if hit:
                images.append((ds, i))
                labels.append(target)
    return images, np.asarray(labels)


@torch.no_grad()
def rank_first_share(model, images, labels: np.ndarray, prompts: dict[str, list[str]], batch: int = 32) -> dict:
    from fundus_lab.eval.zero_shot import class_embeddings

    text = class_embeddings(model, list(prompts.values())).float()  # [C, D]
    preds = []
    for start in range(0, len(images), batch):
        x = torch.stack([ds[i]["image"] for ds, i in images[start:start + batch]])
        z = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)  # [B, D]
        preds.append((z @ text.T).argmax(1).numpy())
    pred = np.concatenate(preds) if preds else np.zeros(0, int)
    per_class = {name: (int((pred[labels == c] == c).sum()), int((labels == c).sum()))
                 for c, name in enumerate(prompts)}
    return {"share": float((pred == labels).mean()) if len(labels) else float("nan"), "n": int(len(labels)),
            "per_class": per_class}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: the run's --method)")
    parser.add_argument("--run-dir", default=None, help="the run folder (default: the preset's eval.output_dir)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--method", default="ours", help="the playground's default checkpoint")
    parser.add_argument("--data-root", default=None, help="the synthetic benchmark (default: the preset's)")
    parser.add_argument("overrides", nargs="*", help="key=value, as given to reproduce")
    args = parser.parse_args(argv)

    from fundus_lab.experiment import Run, dataset_root, ensure_synthetic

    run = Run(args.preset, args.run_dir, args.data_root, args.overrides)
    cfg = run.config()
    if args.checkpoint:
        from fundus_lab.models import load_model

        model, source = load_model(args.checkpoint).eval(), args.checkpoint
    else:
        model, source = run.model(args.method), run.checkpoint(args.method)
    ensure_synthetic(cfg, [d for _, d, _ in CLASSES], run.data_root)
    from fundus_lab.data import open_dataset

    def opener(name):
        size = getattr(getattr(model, "model_cfg", None), "img_size", cfg.model.img_size)
        return open_dataset(name, root=dataset_root(cfg, name, run.data_root), split="test", image_size=size)

    prompts = default_prompts()
    images, labels = test_images(opener)
    result = rank_first_share(model, images, labels, prompts)
    print(f"checkpoint: {source}")
    print(f"in-domain test images of {', '.join(prompts)}: {result['n']}")
    for name, (hit, n) in result["per_class"].items():
        print(f"  {name}: {hit}/{n} ranked first" + (f" ({100 * hit / n:.1f} %)" if n else ""))
    print(f"right class ranked first: {100 * result['share']:.1f} % (chance {100 / len(prompts):.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
