"""Accuracy beyond English: this engine against faster-whisper on the same `base` weights.

Per language (German and French FLEURS utterances of shared/data/speech/fleurs_multilingual,
English short clips of the shared data): language detection accuracy (no `language=` given),
WER of this engine and of faster-whisper on the CTranslate2 original of the same weights (int8,
greedy: beam_size=1, its other options at their defaults, condition_on_previous_text included),
and, for de/fr, how English their translations (task=translate) are: the share of output words
in a small English function-word list, and the share in the source language's own list.

Normalisation: English through speech.evaluation (Whisper's English normaliser), German and
French through a plain one (NFC, lower case, every punctuation mark, apostrophes and hyphens
included, replaced by a space), the same for references and both engines' output.

Usage: .venv/bin/python bench/multilingual.py [--no-translate] [--int8] [--vad energy|silero|none]
       [--langs de,fr,en] [--skip-fw]
Ends with: RESULT lid=<correct>/<n> lid_fw=<correct>/<n> wer=<f> wer_fw=<f>  (pooled over languages)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import unicodedata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.data import DATA, require, short_clips  # noqa: E402

FLEURS = DATA / "fleurs_multilingual"
ENGLISH_FUNCTION_WORDS = frozenset(
    "the a an of to in and is are was were be been it that this with for on as by at from "
    "but not or have has had they he she we you i his her their its there which who".split())
SOURCE_FUNCTION_WORDS = {
    "de": frozenset("der die das und ist nicht sich von zu den dem des ein eine einen mit auf "
                    "für sie er es wir auch wird werden wurde sind war".split()),
    "fr": frozenset("le la les et est des du une un de que qui dans pour pas sur au aux il elle "
                    "ils nous vous ont sont été avec ce cette".split()),
}


def plain_normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text).lower()
    text = "".join(" " if unicodedata.category(c).startswith(("P", "S")) else c for c in text)
    return " ".join(text.split())


def normalizer(lang: str):
    if lang == "en":
        from speech.evaluation import normalize

        return normalize
    return plain_normalize


def edits(ref: str, hyp: str) -> tuple[int, int]:
    """(edits, reference words) of one already normalised pair."""
    import jiwer

    if not ref:
        return 0, 0
    out = jiwer.process_words(ref, hyp)
    return out.substitutions + out.deletions + out.insertions, len(ref.split())


def clips(langs: list[str]) -> list[tuple[str, Path, str]]:
    out = []
    for lang in langs:
        if lang == "en":
            out += [("en", p, p.with_suffix(".txt").read_text().strip()) for p in short_clips()]
        else:
            out += [(lang, p, p.with_suffix(".txt").read_text().strip())
                    for p in sorted(FLEURS.glob(f"fleurs-{lang}-*.ogg"))]
    return out


class _WholeAudio:
    """A 'VAD' that hears speech everywhere: the engine without voice activity detection."""

    def load(self) -> None:
        pass

    def speech_regions(self, audio):  # noqa: ANN001, ANN201
        return [(0, len(audio))] if len(audio) else []


def our_engine(args: argparse.Namespace):
    from speech.asr import WhisperEngine

    engine = WhisperEngine("base", vad=None if args.vad in (None, "none") else args.vad,
                           quantize=args.int8)
    engine.load()
    if args.vad == "none":
        engine.planner.vad = _WholeAudio()
    return engine


def run_ours(engine, audios, options):  # noqa: ANN001, ANN201
    t0 = time.perf_counter()
    out = engine.transcribe(audios, options)
    return [(t.language, t.text, t.language_probs) for t in out], time.perf_counter() - t0


def run_fw(model, audios, task: str):  # noqa: ANN001, ANN201
    t0 = time.perf_counter()
    out = []
    for a in audios:
        segments, info = model.transcribe(a, beam_size=1, task=task)
        out.append((info.language, "".join(s.text for s in segments), {info.language: round(info.language_probability, 4)}))
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--langs", default="de,fr,en")
    parser.add_argument("--no-translate", action="store_true")
    parser.add_argument("--skip-fw", action="store_true")
    parser.add_argument("--int8", action="store_true",
                        help="this engine with its opt-in dynamic int8 (quantize=True), for comparison")
    parser.add_argument("--vad", default=None, choices=("energy", "silero", "none"))
    parser.add_argument("--show", action="store_true", help="print every hypothesis")
    args = parser.parse_args()
    langs = args.langs.split(",")
    require(*([FLEURS] if set(langs) - {"en"} else []))
    import torch

    from speech.audio import decode_audio
    from speech.model_store import ct2_source_dir
    from speech.types import TranscribeOptions

    torch.set_num_threads(2)
    items = clips(langs)
    audios = [decode_audio(p) for _, p, _ in items]
    engine = our_engine(args)
    ours, ours_s = run_ours(engine, audios, TranscribeOptions())
    fw_model = None
    theirs, fw_s = [(None, "", None)] * len(items), float("nan")
    if not args.skip_fw:
        from faster_whisper import WhisperModel

        fw_model = WhisperModel(str(ct2_source_dir("base", engine.cache_dir)), device="cpu",
                                compute_type="int8", cpu_threads=2)
        theirs, fw_s = run_fw(fw_model, audios, "transcribe")
    audio_s = sum(len(a) for a in audios) / 16000
    print(f"audio {audio_s:.1f} s in {len(items)} clips; transcribe wall: engine {ours_s:.1f} s, "
          f"faster-whisper {fw_s:.1f} s")

    foreign = [k for k, (lang, _, _) in enumerate(items) if lang != "en"]
    trans_ours: dict[int, str] = {}
    trans_fw: dict[int, str] = {}
    if foreign and not args.no_translate:
        got, _ = run_ours(engine, [audios[k] for k in foreign], TranscribeOptions(task="translate"))
        trans_ours = {k: g[1] for k, g in zip(foreign, got, strict=True)}
        if fw_model is not None:
            got, _ = run_fw(fw_model, [audios[k] for k in foreign], "translate")
            trans_fw = {k: g[1] for k, g in zip(foreign, got, strict=True)}

    rows = []
    pooled = {"n": 0, "lid": 0, "lid_fw": 0, "e": 0, "e_fw": 0, "w": 0}
    if args.show:
        for k, (lang, path, ref) in enumerate(items):
            norm = normalizer(lang)
            e, w = edits(norm(ref), norm(ours[k][1]))
            e2, _ = edits(norm(ref), norm(theirs[k][1]))
            print(f"{path.name}\t{ours[k][0]}\t{ours[k][2]}\twer={e / max(w, 1):.3f} fw={e2 / max(w, 1):.3f}\n"
                  f"  ref: {norm(ref)}\n  our: {norm(ours[k][1])}\n  fw:  {norm(theirs[k][1])}")
            if k in trans_ours:
                print(f"  translate: {trans_ours[k]}\n  translate fw: {trans_fw.get(k, '')}")
    for lang in langs:
        idx = [k for k, it in enumerate(items) if it[0] == lang]
        norm = normalizer(lang)
        lid = sum(ours[k][0] == lang for k in idx)
        lid_fw = sum(theirs[k][0] == lang for k in idx)
        e = w = e_fw = 0
        per_clip, per_clip_fw = [], []
        for k in idx:
            a, b = edits(norm(items[k][2]), norm(ours[k][1]))
            c, _ = edits(norm(items[k][2]), norm(theirs[k][1]))
            e, w, e_fw = e + a, w + b, e_fw + c
            per_clip.append(a / max(b, 1))
            per_clip_fw.append(c / max(b, 1))
        conf = [ours[k][2].get(lang, 0.0) for k in idx if ours[k][2]]
        share = share_fw = src = src_fw = float("nan")
        if lang != "en" and trans_ours:
            share, src = _shares([trans_ours[k] for k in idx], lang)
            if trans_fw:
                share_fw, src_fw = _shares([trans_fw[k] for k in idx], lang)
        rows.append((lang, len(idx), f"{lid}/{len(idx)}", f"{lid_fw}/{len(idx)}",
                     f"{statistics.median(conf):.3f}" if conf else "-",
                     f"{e / max(w, 1):.3f}", f"{e_fw / max(w, 1):.3f}",
                     f"{statistics.median(per_clip):.3f}", f"{statistics.median(per_clip_fw):.3f}",
                     f"{share:.2f}/{src:.2f}", f"{share_fw:.2f}/{src_fw:.2f}"))
        pooled["n"] += len(idx)
        pooled["lid"] += lid
        pooled["lid_fw"] += lid_fw
        pooled["e"] += e
        pooled["e_fw"] += e_fw
        pooled["w"] += w
    head = ("lang", "clips", "lid", "lid_fw", "p(lang) med", "WER", "WER fw", "WER/clip med",
            "fw/clip med", "transl en/src", "fw transl en/src")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(v).ljust(wd) for v, wd in zip(r, widths, strict=True)))
    wer, wer_fw = pooled["e"] / max(pooled["w"], 1), pooled["e_fw"] / max(pooled["w"], 1)
    print(f"pooled: {pooled['w']} reference words; WER ratio engine/faster-whisper "
          f"{wer / wer_fw if wer_fw else float('nan'):.2f}")
    print(f"RESULT lid={pooled['lid']}/{pooled['n']} lid_fw={pooled['lid_fw']}/{pooled['n']} "
          f"wer={wer:.4f} wer_fw={wer_fw:.4f}")


def _shares(texts: list[str], lang: str) -> tuple[float, float]:
    """(share of English function words, share of the source language's) over all words."""
    words = [w for t in texts for w in plain_normalize(t).split()]
    if not words:
        return 0.0, 0.0
    return (sum(w in ENGLISH_FUNCTION_WORDS for w in words) / len(words),
            sum(w in SOURCE_FUNCTION_WORDS[lang] for w in words) / len(words))


if __name__ == "__main__":
    main()
