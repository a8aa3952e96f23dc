#!/usr/bin/env python3
"""Reference LoRA trainer (transformers + peft, CPU) used as ferrule's baseline.

Two tasks:
  seq-cls    BertForSequenceClassification(num_labels=2) on a JSONL of
             {"text": str, "label": int}. A bare BertModel folder (MiniLM) is
             fine: the classifier head is freshly initialised (seeded) and,
             with task_type SEQ_CLS, peft trains it too (modules_to_save).
  causal-lm  AutoModelForCausalLM from a folder or a .gguf file (dequantized to
             f32 by transformers) on a JSONL of {"messages": [...]}, rendered
             with the model's chat template; loss only on assistant tokens
             (assistant content + its end-of-turn token; labels -100 elsewhere).

What is timed: one optimizer step = collate a pre-tokenized batch into tensors,
forward, backward, AdamW step, LR-scheduler step, zero_grad. Tokenization and
model loading are outside the timed region. The median is over steps after the
first --timing-warmup (default 3) steps.

tokens/s counts padded tokens (batch * padded sequence length). With
--pad-to-max-len every batch is batch_size x max_len, so
tokens_per_s = batch_size * max_len / median_step_s. Without it each batch is
padded to its own longest row; tokens_per_s is then total padded tokens /
total time over the timed steps, and the non-pad figure is given beside it.

Data order: deterministic. Epoch e uses random.Random(seed + e).shuffle of the
record indices; batches are taken in order, the last partial batch of an epoch
is dropped (constant batch shape). Training runs --steps steps, or
--epochs epochs when --steps is 0.

Quantized base (QLoRA): --load-in-4bit (bitsandbytes Params4bit, quant type
--bnb-quant-type, default nf4; --double-quant quantizes the absmax too; compute
dtype f32) or --load-in-8bit (LLM.int8). Only the nn.Linear layers of the
decoder are quantized (transformers keeps lm_head / embeddings / norms dense).
Loaded with device_map="cpu"; bitsandbytes' CPU backend does the (de)quantized
matmuls. "weight_bytes" in the results is the storage of all parameters and
buffers right after loading (packed uint8 for 4-bit, plus the quant_state
absmax / nested statistics), before LoRA is attached.

--gradient-checkpointing: activation checkpointing of every decoder layer,
non-reentrant (torch.utils.checkpoint use_reentrant=False), so peft's LoRA
parameters get gradients without enable_input_require_grads.

Writes one JSON object to --out.
"""
import argparse
import warnings
import json
import math
import os
import platform
import random
import resource
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["seq-cls", "causal-lm"], required=True)
    p.add_argument("--model", required=True, help="model folder, or a .gguf file")
    p.add_argument("--data", required=True, help="training JSONL")
    p.add_argument("--eval-data", default=None, help="evaluation JSONL (optional)")
    p.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N records (0 = all)")
    p.add_argument("--eval-batch-size", type=int, default=0, help="default: --batch-size")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--targets", default="query,value", help="comma-separated target module names")
    p.add_argument("--full-finetune", action="store_true", help="no LoRA: train every parameter")
    p.add_argument("--virtual-tokens", type=int, default=20, help="prompt / prefix tuning: num_virtual_tokens")
    p.add_argument("--method", default="lora", choices=["lora", "dora", "ia3", "ln-tuning", "prompt-tuning", "prefix-tuning", "randlora"],
                   help="peft method; ia3 / ln-tuning use --targets if given, else peft's defaults for the model type")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--pad-to-max-len", action="store_true", help="pad every batch to --max-len")
    p.add_argument("--padding-free", action="store_true",
                   help="causal-lm: transformers' DataCollatorWithFlattening (records end to end in one row, "
                        "position ids restarting; transformers builds the block-diagonal mask from them)")
    p.add_argument("--group-by-length", action="store_true",
                   help="Trainer's group_by_length order: megabatches of 50 batches sorted by length (dynamic padding)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (0: use --epochs)")
    p.add_argument("--epochs", type=float, default=1.0, help="used when --steps 0")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=0.0, help="0 = no clipping")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timing-warmup", type=int, default=3, help="steps excluded from the median")
    p.add_argument("--no-model-dropout", action="store_true",
                   help="set the model's own dropout probabilities to 0 (default: keep config values)")
    p.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes 4-bit base (QLoRA)")
    p.add_argument("--load-in-8bit", action="store_true", help="bitsandbytes LLM.int8 base")
    p.add_argument("--bnb-quant-type", default="nf4", choices=["nf4", "fp4"], help="4-bit quant type")
    p.add_argument("--double-quant", action="store_true", help="4-bit: also quantize the absmax (nested)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="activation checkpointing per decoder layer (use_reentrant=False)")
    p.add_argument("--autocast-bf16", action="store_true",
                   help="forward (and so backward) under torch.autocast('cpu', torch.bfloat16): what HF "
                        "Trainer's bf16=True does on CPU; weights, optimizer and LoRA stay f32")
    p.add_argument("--galore-layerwise", default=None, metavar="OPTIM_ARGS",
                   help="full fine-tuning with HF Trainer's optim='galore_adamw_layerwise', built as "
                        "transformers' _get_galore_optimizer builds it: one galore_torch.GaLoreAdamW per "
                        "parameter (the attn/mlp linear weights projected with OPTIM_ARGS, e.g. "
                        "'rank=64,update_proj_gap=50,scale=0.25,proj_type=std'), stepped with its own "
                        "linear schedule from a post-accumulate-grad hook; no clipping")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--out", required=True, help="results JSON path")
    return p.parse_args(argv)


def loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def weight_bytes(model):
    """Bytes of storage of all parameters and buffers (each tensor once).

    bitsandbytes Params4bit hold packed uint8 (2 values a byte); their quant_state
    adds absmax (uint8 when nested, plus state2's f32 absmax and code) and the
    16-entry code table. Int8Params hold int8 plus their SCB row scales.
    Returns (total, detail dict).
    """
    import torch
    seen = set()
    det = {"params": 0, "buffers": 0, "quant_state": 0, "int8_scb": 0}

    def tb(t):
        if t is None or not isinstance(t, torch.Tensor):
            return 0
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    for _, p in model.named_parameters(remove_duplicate=True):
        det["params"] += tb(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            det["quant_state"] += tb(getattr(qs, "absmax", None)) + tb(getattr(qs, "code", None))
            if getattr(qs, "offset", None) is not None:
                det["quant_state"] += tb(qs.offset) if isinstance(qs.offset, torch.Tensor) else 0
            s2 = getattr(qs, "state2", None)
            if s2 is not None:
                det["quant_state"] += tb(getattr(s2, "absmax", None)) + tb(getattr(s2, "code", None))
        det["int8_scb"] += tb(getattr(p, "SCB", None))
    for _, b in model.named_buffers(remove_duplicate=True):
        det["buffers"] += tb(b)
    return sum(det.values()), det


def read_jsonl(path, limit=0):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
                if limit and len(rows) >= limit:
                    break
    return rows


def cpu_pressure():
    """/proc/pressure/cpu 'some avg10/avg60' (share of time tasks waited for a CPU), or None."""
    try:
        with open("/proc/pressure/cpu") as f:
            first = f.readline().split()
        kv = dict(x.split("=") for x in first[1:])
        return {"some_avg10": float(kv["avg10"]), "some_avg60": float(kv["avg60"])}
    except Exception:
        return None


def maxrss_bytes():
    # Linux: ru_maxrss is in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


class RssPoller:
    """Samples this process's RSS with psutil every `interval` s in a thread."""

    def __init__(self, interval=0.05):
        import threading
        import psutil
        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except Exception:
                pass
            self._stop.wait(self.interval)

    def start(self):
        self._t.start()
        return self

    def stop(self):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return self.peak


# ---------------------------------------------------------------- data

def tokenize_seq_cls(tok, rows, max_len):
    out = []
    for r in rows:
        enc = tok(r["text"], truncation=True, max_length=max_len)
        out.append({"input_ids": enc["input_ids"],
                    "token_type_ids": enc.get("token_type_ids"),
                    "label": int(r["label"])})
    return out


def assistant_spans(tok, messages):
    """Render with the chat template; return (text, [(start, end) char spans of assistant turns]).

    A span is the assistant content plus its end-of-turn marker, trailing
    whitespace after the marker excluded. Found by rendering message prefixes,
    checked to be prefixes of the full rendering.
    """
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        pre = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(pre) or not full.startswith(upto) or len(pre) > len(upto):
            raise ValueError("chat template rendering is not prefix-consistent; cannot locate assistant span")
        end = len(upto.rstrip())
        spans.append((len(pre), end))
    return full, spans


def tokenize_causal(tok, rows, max_len):
    out = []
    n_trunc = 0
    for r in rows:
        text, spans = assistant_spans(tok, r["messages"])
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = []
        for tid, (s, e) in zip(ids, enc["offset_mapping"]):
            inside = any(s >= a and s < b for a, b in spans)
            labels.append(tid if inside else -100)
        if len(ids) > max_len:
            n_trunc += 1
            ids, labels = ids[:max_len], labels[:max_len]
        out.append({"input_ids": ids, "labels": labels})
    return out, n_trunc


def collate(task, items, pad_id, pad_to):
    import torch
    L = pad_to if pad_to else max(len(it["input_ids"]) for it in items)
    B = len(items)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask}
    if task == "seq-cls":
        tt = torch.zeros((B, L), dtype=torch.long)
        batch["token_type_ids"] = tt
        batch["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
    else:
        lab = torch.full((B, L), -100, dtype=torch.long)
        batch["labels"] = lab
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        ids[i, :n] = torch.tensor(it["input_ids"], dtype=torch.long)
        mask[i, :n] = 1
        if task == "seq-cls":
            if it.get("token_type_ids") is not None:
                tt[i, :n] = torch.tensor(it["token_type_ids"], dtype=torch.long)
        else:
            lab[i, :n] = torch.tensor(it["labels"], dtype=torch.long)
    return batch


def grouped_batch_order(lengths, batch_size, seed):
    """transformers' LengthGroupedSampler (trainer_pt_utils.get_length_grouped_indices): each
    epoch's shuffled indices cut into megabatches of 50 batches, each sorted by length
    (longest first), then cut into batches; the longest batch goes first. Last partial batch dropped."""
    n, epoch = len(lengths), 0
    while True:
        idx = list(range(n))
        random.Random(seed + epoch).shuffle(idx)
        mega = 50 * batch_size
        order = []
        for s in range(0, n, mega):
            order.extend(sorted(idx[s: s + mega], key=lambda i: -lengths[i]))
        batches = [order[s: s + batch_size] for s in range(0, n - batch_size + 1, batch_size)]
        if batches:
            longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
            batches[0], batches[longest] = batches[longest], batches[0]
        for b in batches:
            yield epoch, b
        epoch += 1


def batch_order(n, batch_size, seed):
    """Yields lists of indices forever: epoch e shuffled with Random(seed + e), last partial batch dropped."""
    epoch = 0
    while True:
        idx = list(range(n))
        random.Random(seed + epoch).shuffle(idx)
        for s in range(0, n - batch_size + 1, batch_size):
            yield epoch, idx[s: s + batch_size]
        epoch += 1


# ---------------------------------------------------------------- main

def layerwise_galore(model, args, total_steps):
    """transformers' optim='galore_adamw_layerwise' (trainer.py, _get_galore_optimizer): the
    linear weights of modules whose name holds attn or mlp get GaLore's projection with
    optim_args, every parameter its own GaLoreAdamW (lr only, as HF passes it) and linear
    schedule, stepped and zeroed by a post-accumulate-grad hook."""
    import re

    import torch
    from galore_torch import GaLoreAdamW
    from transformers import get_linear_schedule_with_warmup

    galore_kwargs = {"rank": 128, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
    for pair in args.galore_layerwise.replace(" ", "").split(","):
        k, v = pair.split("=")
        galore_kwargs[k] = v if k == "proj_type" else (float(v) if k == "scale" else int(v))
    targets = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and re.search(r"attn|mlp", name):
            targets.add(id(module.weight))
    hooks = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        group = {"params": [p], **galore_kwargs} if id(p) in targets else {"params": [p]}
        o = GaLoreAdamW([group], lr=args.lr)
        hooks[p] = (o, get_linear_schedule_with_warmup(o, args.warmup_steps, total_steps))

    def step(p):
        if p.grad is not None:
            o, sch = hooks[p]
            o.step()
            o.zero_grad()
            sch.step()

    for p in hooks:
        p.register_post_accumulate_grad_hook(step)


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    t_start = time.perf_counter()
    load_before = loadavg()
    psi_before = cpu_pressure()

    os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF de-quantization progress bar
    import torch
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    import transformers
    import peft
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup
    transformers.logging.set_verbosity_error()
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except Exception:
        pass

    # ---- model + tokenizer
    t0 = time.perf_counter()
    if args.model.endswith(".gguf"):
        mdir, gguf_file = os.path.dirname(os.path.abspath(args.model)), os.path.basename(args.model)
        load_kw = {"gguf_file": gguf_file}
    else:
        mdir, load_kw = args.model, {}
    tok = AutoTokenizer.from_pretrained(mdir, **load_kw)
    if args.load_in_4bit and args.load_in_8bit:
        raise SystemExit("--load-in-4bit and --load-in-8bit are exclusive")
    quant_record = None
    if args.load_in_4bit or args.load_in_8bit:
        from transformers import BitsAndBytesConfig
        import bitsandbytes
        if args.load_in_4bit:
            qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=args.bnb_quant_type,
                                      bnb_4bit_use_double_quant=args.double_quant,
                                      bnb_4bit_compute_dtype=torch.float32)
        else:
            qcfg = BitsAndBytesConfig(load_in_8bit=True)
        load_kw = dict(load_kw, quantization_config=qcfg, device_map="cpu")
        quant_record = {"method": "bitsandbytes", "bitsandbytes": bitsandbytes.__version__,
                        "load_in_4bit": args.load_in_4bit, "load_in_8bit": args.load_in_8bit}
        if args.load_in_4bit:
            quant_record.update({"bnb_4bit_quant_type": args.bnb_quant_type,
                                 "bnb_4bit_use_double_quant": args.double_quant,
                                 "bnb_4bit_compute_dtype": "float32"})
    if args.task == "seq-cls":
        from transformers import BertForSequenceClassification
        model = BertForSequenceClassification.from_pretrained(mdir, num_labels=2, dtype=torch.float32, **load_kw)
        task_type = peft.TaskType.SEQ_CLS
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32, **load_kw)
        task_type = peft.TaskType.CAUSAL_LM
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    pad_id = tok.pad_token_id
    if args.no_model_dropout:
        for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "classifier_dropout"):
            if getattr(model.config, k, None):
                setattr(model.config, k, 0.0)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    wbytes, wbytes_detail = weight_bytes(model)  # right after loading, before LoRA / kbit prep
    # Params4bit count packed bytes as elements; report the logical count too.
    n_params_total = sum(p.numel() for p in model.parameters())
    n_params_logical = sum(int(getattr(getattr(p, "quant_state", None), "shape", p.shape).numel())
                           for p in model.parameters())
    quantized_linears = 0
    if quant_record is not None:
        import bitsandbytes as bnb
        quantized_linears = sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
        quant_record["quantized_linear_modules"] = quantized_linears
        if quantized_linears == 0:
            raise SystemExit("quantization requested but no bitsandbytes Linear modules were created")
        # peft.prepare_model_for_kbit_training on this CPU/f32 setup only (1) freezes every
        # base parameter (get_peft_model does that too), (2) upcasts fp16/bf16 non-Params4bit
        # tensors to f32 (none here: everything dense is already f32, so memory does not
        # change), and (3) enables gradient checkpointing when asked. It works on CPU, so it
        # is called; weight_bytes is measured above, before it, and re-measured after it.
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        quant_record["prepare_model_for_kbit_training"] = True
        quant_record["weight_bytes_after_prepare"] = weight_bytes(model)[0]
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Non-reentrant checkpointing needs no enable_input_require_grads (the frozen
    # embedding output may stay requires_grad=False; LoRA params still get grads).
    if args.gradient_checkpointing:
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False
        if not getattr(model, "is_gradient_checkpointing", False):
            raise SystemExit("gradient checkpointing did not switch on")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not args.full_finetune:
        if args.method == "ia3":
            cfg = peft.IA3Config(task_type=task_type, target_modules=targets or None)
        elif args.method == "ln-tuning":
            cfg = peft.LNTuningConfig(task_type=task_type, target_modules=targets or None)
        elif args.method == "prompt-tuning":
            cfg = peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=args.virtual_tokens)
        elif args.method == "prefix-tuning":
            cfg = peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=args.virtual_tokens)
        elif args.method == "randlora":
            cfg = peft.RandLoraConfig(task_type=task_type, r=args.r, randlora_alpha=args.alpha, target_modules=targets)
        else:
            cfg = peft.LoraConfig(task_type=task_type, r=args.r, lora_alpha=args.alpha,
                                  lora_dropout=args.lora_dropout, target_modules=targets,
                                  use_dora=args.method == "dora")
        model = peft.get_peft_model(model, cfg)
    model.train()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    load_s = time.perf_counter() - t0
    rss_after_load = maxrss_bytes()

    # ---- data
    t0 = time.perf_counter()
    train_rows = read_jsonl(args.data)
    eval_rows = read_jsonl(args.eval_data, args.eval_limit) if args.eval_data else []
    n_trunc_train = n_trunc_eval = 0
    if args.task == "seq-cls":
        train = tokenize_seq_cls(tok, train_rows, args.max_len)
        evald = tokenize_seq_cls(tok, eval_rows, args.max_len)
    else:
        train, n_trunc_train = tokenize_causal(tok, train_rows, args.max_len)
        evald, n_trunc_eval = tokenize_causal(tok, eval_rows, args.max_len)
        # Records with no assistant token left after truncation would give NaN loss.
        train = [t for t in train if any(l != -100 for l in t["labels"])]
        evald = [t for t in evald if any(l != -100 for l in t["labels"])]
    tokenize_s = time.perf_counter() - t0
    steps_per_epoch = len(train) // args.batch_size
    total_steps = args.steps if args.steps > 0 else max(1, int(math.floor(args.epochs * steps_per_epoch)))
    pad_to = args.max_len if args.pad_to_max_len else 0

    # ---- optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if args.galore_layerwise:
        layerwise_galore(model, args, total_steps)
        opt = sched = None
    else:
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        sched = get_linear_schedule_with_warmup(opt, args.warmup_steps, total_steps)

    # ---- train
    poller = RssPoller().start()
    if args.group_by_length:
        order = grouped_batch_order([len(t["input_ids"]) for t in train], args.batch_size, args.seed)
    else:
        order = batch_order(len(train), args.batch_size, args.seed)
    flatten = None
    if args.padding_free:
        if args.task != "causal-lm" or args.pad_to_max_len:
            sys.exit("--padding-free is for causal-lm without --pad-to-max-len (BERT takes no packed rows in transformers)")
        from transformers import DataCollatorWithFlattening
        flatten = DataCollatorWithFlattening(return_position_ids=True)
        # transformers 5.24 builds the block-diagonal mask from the position ids only without a
        # cache (masking_utils._preprocess_mask_arguments: `cache is None`); with use_cache on,
        # the decoder makes a DynamicCache even in training and every record attends to the
        # records before it in the row (measured on the tiny llama fixture: logits off by 4.07).
        model.config.use_cache = False
    step_cpu, step_times, losses, lrs, padded_tokens, real_tokens, label_tokens = [], [], [], [], [], [], []
    t_train = time.perf_counter()
    for step in range(total_steps):
        epoch, idx = next(order)
        lrs.append(sched.get_last_lr()[0] if sched else float("nan"))
        ts = time.perf_counter()
        cs = time.process_time()
        if flatten is not None:
            batch = flatten([{"input_ids": train[i]["input_ids"], "labels": train[i]["labels"]} for i in idx], return_tensors="pt")
        else:
            batch = collate(args.task, [train[i] for i in idx], pad_id, pad_to)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast_bf16):
            out = model(**batch)
            loss = out.loss
        loss.backward()
        if opt is not None:  # layer-wise GaLore stepped in the backward's hooks
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - ts
        step_cpu.append(time.process_time() - cs)
        lv = float(loss.detach())
        step_times.append(dt)
        losses.append(lv)
        padded_tokens.append(int(batch["input_ids"].numel()))
        real_tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else int(batch["input_ids"].numel()))
        if args.task == "causal-lm":
            label_tokens.append(int((batch["labels"][:, 1:] != -100).sum()))
        if args.log_every and (step % args.log_every == 0 or step == total_steps - 1):
            print(f"step {step + 1}/{total_steps} epoch {epoch} loss {lv:.4f} lr {lrs[-1]:.3e} "
                  f"seq {batch['input_ids'].shape[1]} {dt:.3f}s", file=sys.stderr, flush=True)
    train_s = time.perf_counter() - t_train
    rss_peak_train_psutil = poller.stop()
    rss_peak_train_ru = maxrss_bytes()

    # ---- eval
    ev = {}
    if evald:
        t0 = time.perf_counter()
        model.eval()
        ebs = args.eval_batch_size or args.batch_size
        tot_loss, tot_n, correct = 0.0, 0, 0
        with torch.no_grad():
            for s in range(0, len(evald), ebs):
                batch = collate(args.task, evald[s: s + ebs], pad_id, pad_to)
                labels = batch.pop("labels")
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast_bf16):
                    logits = model(**batch).logits.float()
                if args.task == "seq-cls":
                    tot_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
                    tot_n += labels.numel()
                    correct += int((logits.argmax(-1) == labels).sum())
                else:
                    sl = logits[:, :-1].reshape(-1, logits.shape[-1])
                    tl = labels[:, 1:].reshape(-1)
                    tot_loss += float(torch.nn.functional.cross_entropy(sl, tl, ignore_index=-100, reduction="sum"))
                    tot_n += int((tl != -100).sum())
        ev = {"eval_records": len(evald), "eval_loss": tot_loss / max(tot_n, 1),
              "eval_loss_normalisation": "mean over examples" if args.task == "seq-cls"
              else "mean over assistant (label) tokens of the whole eval set",
              "eval_s": time.perf_counter() - t0}
        if args.task == "seq-cls":
            ev["eval_accuracy"] = correct / max(tot_n, 1)
        else:
            ev["eval_label_tokens"] = tot_n

    # ---- summary
    w = args.timing_warmup if total_steps > args.timing_warmup else 0
    timed = step_times[w:]
    med = statistics.median(timed)
    tp = padded_tokens[w:]
    if args.pad_to_max_len:
        tps = args.batch_size * args.max_len / med
        tps_def = "batch_size * max_len / median_step_s (all tokens padded to max_len, pad counted)"
    elif args.padding_free:
        tps = sum(tp) / sum(timed)
        tps_def = "sum(tokens) / sum(step_s) over timed steps (padding-free rows: every position is a real token)"
    else:
        tps = sum(tp) / sum(timed)
        tps_def = "sum(padded tokens) / sum(step_s) over timed steps (each batch padded to its longest row, pad counted)"
    tps_real = sum(real_tokens[w:]) / sum(timed)

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import psutil
        versions["psutil"] = psutil.__version__
    except Exception:
        pass
    attn_impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    res = {
        "tool": "python-reference",
        "script": "bench/hf_train.py",
        "argv": sys.argv[1:] if argv is None else argv,
        "args": vars(args),
        "versions": versions,
        "host": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(),
                 "torch_threads": torch.get_num_threads(),
                 "loadavg_before": load_before, "loadavg_after": loadavg(),
                 "cpu_pressure_before": psi_before, "cpu_pressure_after": cpu_pressure(),
                 "train_cpu_utilisation": sum(step_cpu[w:]) / sum(timed),
                 "train_cpu_utilisation_definition": "process CPU seconds / wall seconds over timed steps "
                                                     "(= threads when the machine is otherwise idle)"},
        "model": {"path": args.model, "params_total": n_params_total, "params_trainable": n_trainable,
                  "trainable_tensors": len(trainable_names),
                  "trainable_non_lora": [n for n in trainable_names if "lora_" not in n],
                  "params_total_logical": n_params_logical,
                  "attn_implementation": attn_impl, "dtype": "float32",
                  "autocast": "bfloat16 (cpu)" if args.autocast_bf16 else None,
                  "gradient_checkpointing": bool(args.gradient_checkpointing),
                  "model_dropout": "disabled" if args.no_model_dropout else "config values (train mode)"},
        "quantization": quant_record,
        "weight_bytes": wbytes,
        "weight_bytes_detail": wbytes_detail,
        "weight_bytes_definition": "sum of numel*element_size over parameters and buffers right after loading, "
                                   "before LoRA (4-bit: packed uint8 + quant_state absmax/code/nested stats)",
        "data": {"train_records": len(train), "eval_records": len(evald),
                 "train_truncated": n_trunc_train, "eval_truncated": n_trunc_eval,
                 "steps_per_epoch": steps_per_epoch, "epochs_run": total_steps / max(steps_per_epoch, 1)},
        "steps": total_steps,
        "timing_warmup_steps": w,
        "median_step_s": med,
        "mean_step_s": statistics.mean(timed),
        "min_step_s": min(timed),
        "max_step_s": max(timed),
        "tokens_per_s": tps,
        "tokens_per_s_definition": tps_def,
        "tokens_per_s_nonpad": tps_real,
        "padded_tokens_per_step_median": statistics.median(tp),
        "step_s": step_times,
        "step_cpu_s": step_cpu,
        "loss": losses,
        "lr": lrs,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "final_loss_mean_last10": statistics.mean(losses[-10:]),
        "label_tokens_per_step": label_tokens or None,
        **ev,
        "peak_rss_bytes": maxrss_bytes(),
        "peak_rss_bytes_train_ru_maxrss": rss_peak_train_ru,
        "peak_rss_bytes_train_psutil": rss_peak_train_psutil,
        "rss_bytes_after_load_ru_maxrss": rss_after_load,
        "peak_rss_definition": "ru_maxrss of this process (whole run, incl. load and eval); psutil = polled RSS during training",
        "load_s": load_s,
        "tokenize_s": tokenize_s,
        "train_s": train_s,
        "total_s": time.perf_counter() - t_start,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    summary = {k: res.get(k) for k in ("tokens_per_s", "median_step_s", "first_loss", "final_loss", "weight_bytes",
                                       "eval_loss", "eval_accuracy", "peak_rss_bytes")}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
