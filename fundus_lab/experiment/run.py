"""One experiment (a ``Run``): the configs, checkpoints and evaluations every notebook and
``fundus-lab compare`` share.

    run = Run("default", "runs/default", overrides=["method.mask_ratio=0.5"])
    run.config("ours")                    # resolve_run_config(preset, method, overrides): the one way
    run.checkpoint("eva")                 # pretrains the clip teacher first, then eva; cached
    run.evaluate("ours", "few_shot")      # every test column at once; cached by key
    run.add_external("biomedclip", "ckpt/")  # an outside model (fl.load_model reads it) joins the table
    compare(run, ["clip", "ours"])        # Tables 1 and 2 (fundus_lab.experiment.table)

A notebook builds its run in one call from its ``parameters`` cell,
``fl.Run(preset, run_dir, data_root, overrides, notebook="04_zero_shot", methods=methods,
train_if_missing=train_if_missing)``: it opens the run ``runs/latest`` names, adds the
notebook's figure and table folders, and raises :class:`CheckpointMissing` rather than train
unless ``train_if_missing=True``.

An outside model is registered on the run, not in a registry: it is evaluated like a method,
once (it is not pretrained here), keyed by a hash of its files.

Layout of ``run_dir``::

    pretrain/<method>/seed<s>/             pretraining run (config.yaml, split.csv, checkpoint-last/),
                              cache_key.json  hash of its inputs; an unchanged run is not redone
    eval/<method>/seed<s>/<protocol>.json  metrics, test predictions, key, config, split files
                                           (an outside model: eval/<name>/seed<first seed>/)
    eval/<method>/seed<s>/splits/          the exact samples each evaluation saw
    pretrain/eva-teacher/seed<s>/          EVA's CLIP teacher when it trains other steps than the clip row
                                           (train.budget=flops)
    splits/<dataset>.json                  one split assignment per dataset, shared by every method
    figures/<notebook>/, tables/<notebook>/  what each notebook draws and writes
    table1.{csv,md,tex}, table2.{csv,md,tex}, pairs.{csv,md}, table2_pairs.{csv,md},
    few_shot.{csv,md,tex}, results.json
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from fundus_lab import config as C
from fundus_lab.budget import TEACHER_METHOD, training_flops
from fundus_lab.data import open_dataset
from fundus_lab.experiment.configs import apply_runtime, device, normalise_overrides, resolve_run_config
from fundus_lab.experiment.datasets import dataset_root, ensure_synthetic, open_split
from fundus_lab.experiment.notebook import CheckpointMissing, estimate_training, notebook_arguments
from fundus_lab.experiment.pretraining import (finished, needs_teacher, pretrain_cached, pretrain_in_processes,
                                               pretrain_key, reference_key)
from fundus_lab.experiment.protocols import COLUMNS, PROTOCOLS, Protocol, evaluate_model
from fundus_lab.experiment.references import REFERENCES, PixelFeatures
from fundus_lab.experiment.store import KEY_FILE, external_fingerprint, mkdir, read_json, write_json
from fundus_lab.models import load_model
from fundus_lab.names import check_name, split_names
from fundus_lab.train import run_dir_for


class Run:
    """One experiment: a preset, overrides, a run folder and the data root.

    Args:
        preset: ``smoke`` | ``default`` | ``paper``; None = ``default`` (a notebook's: the run's).
        run_dir: where pretraining runs, evaluations and tables go (None = ``eval.output_dir``;
            a notebook's: ``"latest"`` or None = the run ``runs/latest`` names, see
            :func:`fundus_lab.experiment.notebook.notebook_arguments`).
        data_root: the synthetic benchmark's folder (and where real datasets are found);
            None = the preset's ``data.synth_root`` (relative paths are from the project root).
        overrides: ``key=value`` (list or mapping) for every config of the run.
        force: redo cached pretraining and evaluations.
        path: a YAML file of config sections for every config of the run.
        notebook: the notebook this run is opened for: its figures and tables go to
            ``figures/<notebook>/`` and ``tables/<notebook>/``, and what its ``parameters``
            cell leaves None comes from the run folder's ``parameters.json``.
        methods: the methods a notebook compares (list, or comma-separated); None = the run's,
            else the preset's default.
        train_if_missing: train a checkpoint the run folder lacks; False raises
            :class:`CheckpointMissing` with what would be trained and about how long instead.
            None = True, or False for a notebook (notebooks never train by surprise).
    """

    def __init__(self, preset: str | None = None, run_dir: str | Path | None = None,
                 data_root: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] | None = None,
                 force: bool = False, path: str | Path | None = None, *, notebook: str | None = None,
                 methods: Sequence[str] | str | None = None, train_if_missing: bool | None = None):
        if notebook is not None:
            preset, run_dir, data_root, methods, overrides = notebook_arguments(
                notebook, preset, run_dir, data_root, methods, overrides)
        self.notebook, self.methods = notebook, split_names(methods)
        self.train_if_missing = notebook is None if train_if_missing is None else bool(train_if_missing)
        self.path, self.force = path, force
        self.overrides = normalise_overrides(overrides)
        base = C.resolve_config(preset, overrides=self.overrides, path=path)
        self.preset = base.preset
        self.data_root = str(C.resolve_path(data_root if data_root is not None else base.data.synth_root))
        self.run_dir = C.resolve_path(run_dir if run_dir is not None else base.eval.output_dir.format(preset=self.preset))
        apply_runtime(base)  # notebooks' own inference (attention, embeddings) runs under the same settings
        self._models: dict = {}
        self._checkpoints: dict = {}
        self.externals: dict[str, Path] = {}  # outside models: name -> path (add_external)

    def __repr__(self) -> str:
        return (f"Run({self.preset!r}, run_dir={str(self.run_dir)!r}, notebook={self.notebook!r}, "
                f"methods={self.methods}, overrides={self.overrides}, train_if_missing={self.train_if_missing})")

    # a notebook's folders and data -------------------------------------------------------

    def figure_dir(self) -> Path:
        """``figures/<notebook>/`` in the run folder, made on first use."""
        return mkdir(self.run_dir / "figures" / self._notebook_name())

    def table_dir(self) -> Path:
        """``tables/<notebook>/`` in the run folder, made on first use."""
        return mkdir(self.run_dir / "tables" / self._notebook_name())

    def _notebook_name(self) -> str:
        if self.notebook is None:
            raise ValueError("figure and table folders belong to a notebook's run: Run(..., notebook=NAME)")
        return self.notebook

    def data(self) -> Path:
        """The synthetic benchmark's root, written on first use."""
        return ensure_synthetic(self.config())

    def dataset(self, name: str, split: str = "test", **kwargs):
        """``fl.data.open_dataset`` with this run's data root and the preset's image size."""
        cfg = self.config()
        root = kwargs.pop("root", None)
        if root is None and name.startswith("synth-"):
            ensure_synthetic(cfg)
        if root is None:  # synthetic: <data_root>/<name>; real: <data_root>/<name> (or the manifest's own)
            root = dataset_root(cfg, name, self.data_root)
        kwargs.setdefault("image_cache", cfg.data.image_cache)
        kwargs.setdefault("image_cache_dir", cfg.data.image_cache_dir)
        return open_dataset(name, root=root, split=split, image_size=kwargs.pop("image_size", cfg.model.img_size),
                            **kwargs)

    # outside models ----------------------------------------------------------------------

    def add_external(self, name: str, path: str | Path) -> Path:
        """Register an outside model as the table row ``name``: anything ``fl.load_model``
        reads (a Hugging Face CLIP folder, an open_clip checkpoint, another run's checkpoint).

        It is evaluated by the same protocols, splits and cache layout as a method, once
        (``eval/<name>/seed<first pretraining seed>/``): it is not pretrained here. The name
        must not be a method's or a reference row's; the path must exist. Returns the path.
        """
        name = check_name(str(name), "external model name")  # it names the folder eval/<name>/
        taken = "method" if name in C.available_methods() else "reference row" if name in REFERENCES else None
        if taken:
            raise C.ConfigError(f"external model name {name!r} is the name of a {taken}; give the outside model "
                                "another name")
        path = Path(path).expanduser().absolute()
        if not path.exists():
            raise C.ConfigError(f"external model {name!r}: {path} does not exist")
        if self.externals.get(name, path) != path:
            raise C.ConfigError(f"external model {name!r} is already {self.externals[name]}; not also {path}")
        self.externals[name] = path
        return path

    def seeds_of(self, method: str) -> list[int]:
        """The pretraining seeds ``method`` is evaluated for: all of them, or the first for an
        outside model (one set of weights, not pretrained here)."""
        seeds = self.seeds()
        return seeds[:1] if method in self.externals else seeds

    # configs -----------------------------------------------------------------------------

    def config(self, method: str | None = None, seed: int | None = None) -> "C.Config":
        """The run's config (for ``method`` and pretraining ``seed``):
        :func:`fundus_lab.experiment.configs.resolve_run_config`, final as returned."""
        if method in self.externals:  # evaluated under the run's settings; no pretraining config
            return self.config(None, seed)
        ref = REFERENCES.get(method) if method in REFERENCES else None
        overrides = self.overrides
        if ref is not None:  # the frame stays put: a reference row sees train.steps' images under any budget
            overrides = {**overrides, "train.budget": "steps"}
        return resolve_run_config(
            self.preset, ref.architecture if ref else method, overrides, path=self.path, seed=seed,
            synth_root=self.data_root, name=method if method is not None and ref is None else None,
            pretrain_dir=self.run_dir / "pretrain" / method if method is not None else None,
            # training asked for from a notebook shows its bar (not part of the cache key)
            progress=self.notebook is not None and self.train_if_missing and method is not None)

    def seeds(self) -> list[int]:
        return [int(s) for s in self.config().eval.pretrain_seeds]

    # checkpoints -------------------------------------------------------------------------

    def checkpoint(self, method: str, seed: int | None = None, callbacks: Iterable = ()) -> Path:
        """``checkpoint-last`` of ``method`` (a method or a reference row), made on first use.

        ``eva`` (any method whose image-generation target is a teacher) first gets a ``clip``
        teacher trained under the same budget and seed. With ``train_if_missing`` False, a
        checkpoint that would need training raises :class:`CheckpointMissing` saying what
        would be trained and about how long.
        """
        if not self.train_if_missing:
            plan = self.untrained(method, seed)
            if plan:
                raise CheckpointMissing(self.run_dir, [{**p, **estimate_training(p, self.preset, self.run_dir)}
                                                       for p in plan]) from None
        seed = self.seeds()[0] if seed is None else int(seed)
        if (method, seed) in self._checkpoints and not callbacks:  # already made (or checked) in this Run
            return self._checkpoints[(method, seed)]
        if method in self.externals:
            path = self.externals[method]
        elif method in REFERENCES:
            path = self._reference_checkpoint(method, seed)
        else:
            path = self._pretrained_checkpoint(method, seed, callbacks)
        self._checkpoints[(method, seed)] = path
        return path

    def _pretrained_checkpoint(self, method: str, seed: int, callbacks: Iterable) -> Path:
        mcfg = self.config(method, seed)
        apply_runtime(mcfg)
        ensure_synthetic(mcfg, [mcfg.data.dataset], self.data_root)
        if needs_teacher(mcfg):
            mcfg.method.teacher_checkpoint = str(self._teacher_checkpoint(method, mcfg))
        return pretrain_cached(mcfg, self.force, callbacks=tuple(callbacks)) / "checkpoint-last"

    def _teacher_checkpoint(self, method: str, mcfg: "C.Config") -> Path:
        """EVA's CLIP teacher: the clip row's own checkpoint when it trains the same steps
        (``train.budget: steps``), else (``flops``: ``train.teacher_steps``) a clip run of its
        own in ``pretrain/<method>-teacher/seed<s>``."""
        seed, steps = mcfg.train.seed, mcfg.train.teacher_steps
        if steps is None or steps == self.config(TEACHER_METHOD, seed).train.steps:
            return self.checkpoint(TEACHER_METHOD, seed)
        tcfg = resolve_run_config(self.preset, TEACHER_METHOD, {**self.overrides, "train.budget": "steps",
                                                                "train.steps": steps},
                                  path=self.path, seed=seed, synth_root=self.data_root,
                                  pretrain_dir=self.run_dir / "pretrain" / f"{method}-teacher")
        apply_runtime(tcfg)
        return pretrain_cached(tcfg, self.force) / "checkpoint-last"

    def _reference_checkpoint(self, name: str, seed: int | None) -> Path:
        ref = REFERENCES.get(name)
        mcfg = self.config(name, seed)
        run_dir = Path(mcfg.train.output_dir)
        out = run_dir / "checkpoint-last"
        if ref.build is None:
            return out
        apply_runtime(mcfg)
        ensure_synthetic(mcfg, [mcfg.data.dataset], self.data_root)
        key = reference_key(name, mcfg)
        if self.force or not finished(run_dir, key):
            write_json(run_dir / KEY_FILE, {"key": key, "complete": False})
            C.save_config(mcfg, mkdir(run_dir) / "config.yaml")
            start = time.time()
            ref.build(self, mcfg, out)
            write_json(run_dir / KEY_FILE, {"key": key, "complete": True, "seconds": time.time() - start})
        return out

    def pretraining_waves(self, rows: Sequence[str]) -> list[list[tuple[str, int]]]:
        """The (row, seed) trainings of ``rows`` (methods and trained reference rows; outside
        models and the pixel row train nothing), in waves whose jobs do not depend on each
        other: a method that distils a teacher (``eva``) waits for the wave holding its
        ``clip`` teacher of the same seed, which joins the first wave if not listed."""
        first, second = [], []
        for row in dict.fromkeys(rows):
            if row in self.externals or (row in REFERENCES and REFERENCES.get(row).build is None):
                continue
            for seed in self.seeds_of(row):
                if row not in REFERENCES and needs_teacher(self.config(row, seed)):
                    second.append((row, seed))
                    first.append(("clip", seed))
                else:
                    first.append((row, seed))
        first = list(dict.fromkeys(first))
        return [wave for wave in (first, [job for job in second if job not in first]) if wave]

    def pretrain_parallel(self, rows: Sequence[str], jobs: int) -> dict[tuple[str, int], Path]:
        """Pretrain every (row, seed) of ``rows`` in ``jobs`` processes at once, before anything
        needs the models (:meth:`pretraining_waves` orders teachers first).

        Each job is what :meth:`checkpoint` would do in this process: the same config, cache
        key and code, so its checkpoint is byte-identical to a sequential run's. Each process
        runs ``train.num_threads`` threads (the CLI's ``--jobs N`` sets it to cores / N); on a
        machine with several GPUs job ``i`` sees GPU ``i mod jobs`` only. The synthetic data is
        written here first, so jobs never write it at once. ``jobs`` = 1 does nothing: the
        checkpoints are then made when first used, as always. Returns the checkpoints made.
        """
        if jobs < 1:
            raise C.ConfigError(f"jobs={jobs}: expected 1 or more pretraining processes")
        if jobs == 1:
            return {}
        waves = self.pretraining_waves(rows)
        for row, seed in (job for wave in waves for job in wave):
            cfg = self.config(row, seed)
            ensure_synthetic(cfg, [cfg.data.dataset], self.data_root)
        spec = {"run_class": Run, "preset": self.preset, "run_dir": str(self.run_dir), "data_root": self.data_root,
                "overrides": self.overrides, "force": self.force, "path": self.path}
        return pretrain_in_processes(spec, waves, jobs, self._checkpoints)

    def untrained(self, method: str, seed: int | None = None) -> list[dict]:
        """What :meth:`checkpoint` would train for ``method`` (and ``seed``), in order; [] when
        every checkpoint it needs is cached (or it needs none: outside models, ``pixels``).

        Each entry: ``{"method", "seed", "steps", "batch_size", "kind"}`` (``pretrain`` or
        ``reference``). ``eva`` lists its ``clip`` teacher first when that is missing too;
        ``random-init`` is never listed (it saves initial weights, nothing is trained).
        Nothing is trained; the synthetic data are written if absent (their key needs them).
        """
        seed = self.seeds()[0] if seed is None else int(seed)
        if (method, seed) in self._checkpoints or method in self.externals:
            return []
        mcfg = self.config(method, seed)
        entry = {"method": method, "seed": seed, "steps": mcfg.train.steps, "batch_size": mcfg.train.batch_size,
                 "kind": "reference" if method in REFERENCES else "pretrain"}
        if method in REFERENCES:
            if REFERENCES.get(method).build is None or not REFERENCES.get(method).trains:
                return []
            ensure_synthetic(mcfg, [mcfg.data.dataset], self.data_root)
            done = not self.force and finished(Path(mcfg.train.output_dir), reference_key(method, mcfg))
            return [] if done else [entry]
        ensure_synthetic(mcfg, [mcfg.data.dataset], self.data_root)
        before: list[dict] = []
        if needs_teacher(mcfg):
            before = self.untrained("clip", mcfg.train.seed)
            if before:  # the teacher's weights are part of this run's key: it cannot be cached yet
                return before + [entry]
            mcfg.method.teacher_checkpoint = str(self.checkpoint("clip", mcfg.train.seed))
        key, _ = pretrain_key(mcfg)
        return [] if not self.force and finished(run_dir_for(mcfg), key) else [entry]

    def model(self, method: str, seed: int | None = None):
        """The method's model in eval mode (trained first if needed), kept in memory."""
        seed = self.seeds()[0] if seed is None else seed
        if (method, seed) not in self._models:
            if method in REFERENCES and REFERENCES.get(method).build is None:
                model = PixelFeatures()
            else:
                model = load_model(self.checkpoint(method, seed))
            self._models[(method, seed)] = model.to(device()).eval()
        return self._models[(method, seed)]

    def forget(self, method: str | None = None) -> None:
        """Drop cached models (all, or one method's) to free memory."""
        for key in [k for k in self._models if method is None or k[0] == method]:
            del self._models[key]
        self._checkpoints = {k: v for k, v in self._checkpoints.items() if method is not None and k[0] != method}

    def provenance(self, method: str, seed: int) -> dict:
        if method in self.externals:
            path = str(self.externals[method])
            return {"method": method, "pretrain_seed": None, "external": path, "run_dir": path, "config": None,
                    "checkpoint": path, "pretrain_split": None}
        run = self.run_dir / "pretrain" / method / f"seed{seed}"
        return {"method": method, "pretrain_seed": seed, "run_dir": str(run), "config": str(run / "config.yaml"),
                "checkpoint": str(run / "checkpoint-last"), "pretrain_split": str(run / "split.csv")}

    # evaluation --------------------------------------------------------------------------

    def applies(self, method: str, protocol: str) -> bool:
        return method not in REFERENCES or protocol in REFERENCES.get(method).protocols

    def evaluate(self, method: str, protocol: str, column: str | None = None, seed: int | None = None,
                 dataset: str | None = None) -> dict:
        """One protocol for one method (pretraining ``seed``), exactly as Table 1 runs it.

        Every test column is scored from the same fit; the JSON
        ``eval/<method>/seed<s>/<protocol>.json`` is cached by a key of the weights, the
        settings, the manifest and the split files. Returns it; with ``column`` its
        ``columns[column]`` entry is also under ``"cell"``. ``dataset`` runs the protocol on
        another dataset than the config names for it (e.g. a linear probe on synth-odir);
        its JSON is then ``<protocol>@<dataset>.json``, beside Table 1's.
        """
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r}; expected one of {list(PROTOCOLS)}")
        seed = self.seeds()[0] if seed is None else int(seed)
        record = self._evaluate(method, PROTOCOLS.get(protocol), seed, dataset)
        if column is not None:
            if column not in record["columns"]:
                raise ValueError(f"column {column!r}; expected one of {list(record['columns'])}")
            record["cell"] = record["columns"][column]
        return record

    def _evaluate(self, method: str, protocol: Protocol, seed: int, dataset: str | None = None) -> dict:
        cfg = self.config(method, seed)
        apply_runtime(cfg)
        ecfg = cfg.eval
        name = protocol.name
        if dataset is not None and dataset != getattr(ecfg, protocol.dataset_key):
            setattr(ecfg, protocol.dataset_key, dataset)
            name = f"{protocol.name}@{Path(dataset).stem}"
        dataset = getattr(ecfg, protocol.dataset_key)
        out_dir = self.run_dir / "eval" / method / f"seed{seed}"
        path = out_dir / f"{name}.json"
        provenance = self.provenance(method, seed)
        if not self.applies(method, protocol.name):
            out = {"protocol": protocol.name, "dataset": dataset, "available": False, "values": [], "summary": None,
                   "result": {"reason": f"{method}: {REFERENCES.get(method).note}; {protocol.name} does not apply"},
                   "columns": {c: None for c, _, _ in COLUMNS}, **provenance}
            write_json(path, out)
            return read_json(path)
        pretrain_ds, weights = None, None
        if method in self.externals:  # its pretraining data is unknown here: no overlap check
            weights = external_fingerprint(self.externals[method])
        elif method not in REFERENCES or REFERENCES.get(method).build is not None:
            self.checkpoint(method, seed)
            pretrain_ds = open_split(cfg, cfg.data.dataset, "train", cfg.model.img_size,
                                     cfg.data.root or self.data_root)
        return evaluate_model(lambda: self.model(method, seed), protocol, cfg, out_dir, self.data_root,
                              self.run_dir / "splits", pretrain_ds, provenance, self.force, weights=weights,
                              json_name=name)

    def budget(self, methods: Sequence[str]) -> dict[str, dict]:
        """Each pretrained method's compute under ``train.budget``: {method: {"steps",
        "teacher_steps", "flops_per_step", "flops"}} (:func:`fundus_lab.budget.training_flops`)."""
        return {m: training_flops(self.config(m)) for m in methods if m not in self.externals and m not in REFERENCES}
