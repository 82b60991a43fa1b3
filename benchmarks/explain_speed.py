"""Notebook 02's attention scoring, timed part by part, on random-init default-size models.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/explain_speed.py 60    # 60 synth-odir images

Writes a small synth-odir set (``n`` images, 128 px) under /tmp, then times
``explain.lesion_images``, ``explain.attention_explanations`` over 48 images in batches of
16 for clip, coca, eva and ours at the default preset's sizes (random init: the same
compute as trained weights), and ``explain.lesion_attention_summary`` of the four.
"""
import time, torch, sys
import fundus_lab as fl
from fundus_lab.config import load_config
from fundus_lab.data.tokenizer import default_corpus, train_tokenizer
from fundus_lab.models import build_model
from fundus_lab.eval import explain
t0 = time.perf_counter()
manifest = fl.data.synth.generate("/tmp/fundus_lab_explain_speed/synth-odir", task="odir", n=int(sys.argv[1]), seed=0, image_size=128)
t_gen = time.perf_counter() - t0
ds = fl.data.open_dataset(str(manifest), split="test", image_size=128)
print("test records", len(ds), "generation s", round(t_gen, 1), flush=True)
t = time.perf_counter(); idx = explain.lesion_images(ds); t_lesion = time.perf_counter() - t
print(f"lesion_images over {len(ds)} records: {t_lesion:.2f} s ({len(idx)} with lesions)", flush=True)
tok = train_tokenizer(default_corpus(), vocab_size=4000, model_max_length=192)
models = {}
for m in ("clip", "coca", "eva", "ours"):
    cfg = load_config(preset="default", method=m, overrides=[])
    torch.manual_seed(0)
    models[m] = build_model(cfg.model, cfg.method, tok).eval()
n = min(48, len(idx))
# only len(idx) lesion images here: repeat the batch to 48 for the attention timing
images = torch.stack([ds[i]["image"] for i in idx])
images = images.repeat((48 + len(images) - 1) // len(images), 1, 1, 1)[:48]
for name, model in models.items():
    t = time.perf_counter()
    for s in range(0, 48, 16):
        explain.attention_explanations(model, images[s:s + 16], (128, 128))
    print(f"{name}: attention_explanations over 48 images {time.perf_counter() - t:.2f} s", flush=True)
t = time.perf_counter()
summary = explain.lesion_attention_summary(models, ds, n_images=48)
print(f"lesion_attention_summary, 4 models, {n} images: {time.perf_counter() - t:.2f} s", flush=True)
