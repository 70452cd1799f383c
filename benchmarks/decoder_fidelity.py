"""FastV / PyramidDrop prompt reduction on SmolLM2-135M-Instruct: fidelity of a teacher-forced continuation.

Texts: the license files of installed packages (real English prose, no data set download). For each of
the distributions in TEXTS (or CALIBRATION with ``--texts-from calibration``), its first license file
(sorted by path) with at least PROMPT + CONTINUATION tokens; the first PROMPT tokens are the prompt, the
next CONTINUATION tokens the continuation. ``--texts-from heldout`` takes later windows of
PROMPT + CONTINUATION tokens instead (HELDOUT), ``all`` the evaluation texts and those. The span a method
may remove is the prompt minus its last PROTECTED tokens (kept like an instruction).

For each prefill-FLOPs budget: compile once (stages chosen from the budget), prefill the prompts, then
teacher-force the continuation through decode steps on the reduced per-layer KV caches. Reported: top-1
agreement of the next-token prediction with the full model (one eager forward over prompt +
continuation), perplexity of the true continuation, FLOPs ratio counted on the program, the stages
(layer:span tokens kept from it on) and tokens per layer. ``--eager`` instead takes the stages from the
cost model and the logits from one eager staged pass (same numbers as the compiled program: checked to
1e-4 on the logits, identical agreement and perplexity; minutes faster - for exploration/calibration).

    .venv/bin/python benchmarks/decoder_fidelity.py [--budgets 0.6,0.4] [--method fastv|pyramiddrop]
        [--layer K | L1,L2,.. | auto] [--sinks N] [--pool W] [--lookup N] [--ahead M] [--probes P]
        [--method dart,divprune,zipcache,random [--option KEY=VALUE]] [--compare] [--eager]
        [--texts-from evaluation|calibration|heldout|all] [--texts N] [--json FILE]

Measured here (2 shared CPU cores; 8 evaluation texts, 512-token prompts, span = the first 448). The
bold lookup rows, the rule rows (``the rule: K=...``), plain FastV, the span scores (dart, divprune,
zipcache, random) and the compiled pyramiddrop rows were measured again on 2026-12-02,
after the last layer's dead positions were removed (``passes/eliminate_dead_positions.py``: the prefill
computes the last layer's query, attention row and MLP for the last token alone, 3.1% of the FLOPs, and
the cost model counts it, so a budget keeps more span tokens: 240 instead of 230 at 0.6, 133 instead of
127 at 0.4). Every other row (the eager rows, and the tables below) was measured before it, at the
same FLOPs with those fewer span tokens (their stages say how many; ``--eager`` now plans with the
compiler's own cost model, dead positions included, so it keeps the compiled programs' counts). The earlier figures of the
re-measured rows: lookup 4:230 0.9043 / +8.7% and 3:127 0.8613 / +10.5%; the rule 4:230 0.8984 / +20.1%
and 3:127 0.8535 / +30.0%; plain FastV 2:250 0.7969 / +43.8% and 2:143 0.7344 / +68.7%; dart / divprune
/ zipcache / random 4:230 0.8496 / +32.4%, 0.8145 / +34.1%, 0.8574 / +38.3%, 0.8145 / +37.4%;
pyramiddrop 8:282 15:179 23:114 0.8789 / +20.3% and 8:115 15:30 23:7 0.8281 / +46.4%.

| run | budget | FLOPs ratio | stages (layer:span kept) | top-1 agreement | perplexity | vs full |
|---|---|---|---|---|---|---|
| full model, one forward | - | 1.000 | - | 1.0000 | 5.289 | +0.0% |
| no reduction, prefill + decode loop | 1.0 | 1.000 | - | 1.0000 | 5.289 | +0.0% |
| plain FastV (K=2, last token, no sinks) | 0.6 | 0.600 | 2:260 | 0.8047 | 7.520 | +42.2% |
| fastv layer=auto sinks=4 pool=15 (the rule: K=4) | 0.6 | 0.599 | 4:240 | 0.9023 | 6.335 | +19.8% |
| **fastv layer=auto sinks=4 pool=15 lookup=16** (K=4) | 0.6 | 0.599 | 4:240 | **0.8965** | 5.717 | **+8.1%** |
| dart (pivots 8) layer=auto sinks=4 | 0.6 | 0.599 | 4:240 | 0.8477 | 6.976 | +31.9% |
| divprune layer=auto sinks=4 | 0.6 | 0.599 | 4:240 | 0.8242 | 7.165 | +35.5% |
| zipcache (probes 0.05, causal) layer=auto sinks=4 | 0.6 | 0.599 | 4:240 | 0.8711 | 7.172 | +35.6% |
| random layer=auto sinks=4 | 0.6 | 0.599 | 4:240 | 0.8164 | 7.173 | +35.6% |
| pyramiddrop 8/15/23 sinks=4 pool=15 | 0.6 | 0.600 | 8:288 15:187 23:121 | 0.8848 | 6.326 | +19.6% |
| pyramiddrop paper (8/15/23, ratio r, r^2, r^3 from the budget), eager | 0.6 | 0.600 | 8:287 15:183 23:117 | 0.8594 | 7.101 | +34.2% |
| rule without pool (sinks=4), eager | 0.6 | 0.599 | 4:230 | 0.8457 | 7.487 | +41.5% |
| rule without sinks (pool=15), eager | 0.6 | 0.599 | 4:234 | 0.8984 | 6.355 | +20.1% |
| rule K alone (K=4, no sinks, no pool), eager | 0.6 | 0.599 | 4:234 | 0.8457 | 7.498 | +41.7% |
| plain FastV (K=2, last token, no sinks) | 0.4 | 0.398 | 2:149 | 0.7461 | 8.860 | +67.5% |
| fastv layer=auto sinks=4 pool=15 (the rule: K=3) | 0.4 | 0.399 | 3:133 | 0.8594 | 6.690 | +26.5% |
| **fastv layer=auto sinks=4 pool=15 lookup=16** (K=3) | 0.4 | 0.399 | 3:133 | **0.8613** | 5.854 | **+10.7%** |
| pyramiddrop 8/15/23 sinks=4 pool=15 | 0.4 | 0.400 | 8:120 15:33 23:9 | 0.8320 | 7.726 | +46.1% |
| pyramiddrop paper (8/15/23), eager | 0.4 | 0.400 | 8:123 15:33 23:9 | 0.8086 | 8.185 | +54.7% |
| rule without pool (sinks=4), eager | 0.4 | 0.399 | 3:127 | 0.7812 | 7.975 | +50.8% |
| rule without sinks (pool=15), eager | 0.4 | 0.399 | 3:131 | 0.8535 | 6.878 | +30.0% |
| rule K alone (K=3, no sinks, no pool), eager | 0.4 | 0.399 | 3:131 | 0.7812 | 7.935 | +50.0% |

Tokens per layer (prompt tokens each layer sees and caches; 30 layers): budget 0.6 rule 512 x 4, 308 x 26
(plain K=2: 512 x 2, 324 x 28); budget 0.4 rule 512 x 3, 201 x 27 (plain K=2: 512 x 2, 213 x 28); before
the dead positions were removed 298 / 314 / 195 / 207.
PyramidDrop 8/15/23 sinks=4 pool=15 at 0.6: 512 x 8, 356 x 7, 255 x 8, 189 x 7; at 0.4: 512 x 8, 188 x 7,
101 x 8, 77 x 7 (before the dead positions were removed 350 / 247 / 182 and 183 / 98 / 75; the paper form,
eager, then: 512 x 8, 351 x 7, 247 x 8, 181 x 7 and 512 x 8, 187 x 7, 97 x 8, 73 x 7).

Commands (all with ``--budgets 0.6,0.4``): ``--layer auto --sinks 4 --pool 15 --compare`` (the rule and
plain FastV rows, compiled; about 12 minutes here), ``--method pyramiddrop --sinks 4 --pool 15``
(compiled, about 5 minutes; log benchmarks/results/decoder_fidelity_pyramiddrop.log), and with ``--eager``: ``--method pyramiddrop``; ``--layer auto --sinks 4``; ``--layer auto
--pool 15``; ``--layer auto``. Sinks change nothing at K >= 3 (the score keeps token 0 by itself); the
pooling is what lifts the rule above plain FastV. PyramidDrop's paper stages (8/15/23 of 30) at the same
FLOPs beat plain FastV at 0.6 but not the single pooled stage: at 0.4 its late stages keep 30 and 7 tokens.

The schedule rule (``compile_decoder(layer="auto")``) and the scoring options were set on the 8
CALIBRATION texts (other license files: NVIDIA, fonttools, dateutil, regex, ruff, LGPL...), never on the
evaluation texts. Calibration, budget 0.6, with ``--eager --texts-from calibration --layer K --sinks 4
--pool W`` (sinks=4 unless said; max over heads and most-recent were one-off score variants of a scratch
copy of the eager pass, not options):

| calibration run | stages | agreement | perplexity vs full |
|---|---|---|---|
| plain FastV K=2 (token 0, the attention sink, is pruned in all 8 texts) | 2:250 | 0.775 | +39.0% |
| K=2 sinks=4 | 2:246 | 0.815 | +32.7% |
| K=1 / K=3 (no sinks; K=3 keeps token 0 by itself) | 1:257 / 3:242 | 0.850 / 0.844 | +19.8% / +10.4% |
| K=4 / 6 / 8 / 10 | 4:230 / 6:212 / 8:190 / 10:163 | 0.867 / 0.859 / 0.832 / 0.859 | +10.2 / +17.3 / +22.8 / +19.7% |
| K=4 probes=64 (observation window) / max over heads / keep the most recent span tokens | 4:230 | 0.861 / 0.873 / 0.863 | +11.9 / +9.8 / +6.9% |
| K=4 pool=7 / 11 / 15 / 31 | 4:230 | 0.898 / 0.902 / 0.902 / 0.887 | +9.2 / +9.0 / +8.6 / +14.4% |
| K=4 pool=15 probes=64 | 4:230 | 0.891 | +9.1% |
| K=2 / 3 / 5 pool=15 (K=2 pool=7) | | 0.840 / 0.893 / 0.900 | +24.2 / +9.1 / +10.7% |
| pyramid pool=15 (4,8) / (4,12) / (3,6,12) | 4:310 8:216 / 4:298 12:200 / 3:346 6:270 12:210 | 0.900 / 0.889 / 0.897 | +11.8 / +12.0 / +9.3% |
| pyramid pool=7 (2,8) | 2:317 8:227 | 0.865 | +16.4% |

Budget 0.4 (sinks=4, pool=15): K=1 0.822 / +20.6%, K=2 0.820 / +27.5%, K=3 0.846 / +20.9%, K=4 0.811 /
+21.5% (pool 11), K=5 0.789 / +37.3%; pyramids (2,4) 0.859 / +22.8%, (3,6) 0.832 / +23.4%, (4,8) 0.809 / +33.5%.

Findings. (1) FastV's last-token score at K=1-2 prunes token 0, the attention sink, in every text;
protecting 4 sinks helps (+39% -> +33% at K=2), and from K=3 on the score keeps the sink by itself.
(2) Pooling the score over 15 neighbours (SnapKV) is the largest gain: kept tokens come in runs
(phrases) instead of isolated words. (3) The reduction layer trades off: too early, the layer-K score is
a poor judge; too late, fewer tokens can stay. The rule "the layers before K (full width) cost at most a
quarter of the budget" picks the best single K on calibration at both budgets (K=4 at 0.6, K=3 at 0.4).
(4) Staged pyramids at the same FLOPs did not beat the single stage on calibration perplexity (the
deeper stages keep fewer tokens than one stage keeps, and the late scores do not make up for it).

Commands of the rows added later: ``--budgets 0.6,0.4 --layer auto --sinks 4 --pool 15 --lookup 16``
(compiled, about 7 minutes; the same numbers as a scratch eager copy of the scoring) and ``--budgets 0.6
--layer auto --sinks 4 --method dart,divprune,zipcache,random`` (about 5 minutes; log
benchmarks/results/decoder_fidelity_span_methods.log). The span scores of
the encoder methods lose to FastV's pooled attention here (they do not look at the query at all, or,
for ZipCache, average it over strided probes).

The prompt-lookup prior (``lookup=16``) was chosen on the CALIBRATION texts at 0.6 (K=4, sinks=4,
pool=15; eager scratch copies of the scoring) by one rule fixed before looking at the evaluation texts:
the highest agreement with perplexity within +8%. Calibration rows (agreement / perplexity vs full):

| lookup variant (n-grams of ... looked up earlier; their followers up to ``ahead``=64 past the prompt ranked first) | calibration |
|---|---|
| none (the rule above) | 0.902 / +8.6% |
| the last token's n-gram, n=1 / 2 / 3 / 4 / 8 | 0.898 / +5.4%, 0.897 / +6.2%, 0.904 / +6.0%, 0.904 / +6.0%, 0.904 / +6.0% |
| the last token's n-grams n=1..4, graded (ahead 32 / 64 / 128 for n=1: 0.898 / +5.5%, 0.898 / +5.4%, 0.906 / +5.6%) | 0.900 / +5.6% |
| n=2..4 at each of the last 8 / **16** / 32 tokens (1..4 at the last), graded | 0.900 / +2.8%, **0.902 / +4.5%** (compiled: the same; at 0.4 0.842 / +14.4%), 0.871 / +6.8% |
| n=3..4 at each of the last 16 | 0.895 / +6.6% |
| n=1..4 at each of the last 4 / 8 / 16 | 0.877 / +6.8%, 0.900 / +2.1%, 0.867 / +6.0% |

Other score variants tried on calibration at 0.6 (scratch, not options; none beat the rule): attention
times the value norm 0.904 / +8.4%; max over heads 0.906 / +8.3%; a quarter / half of the kept span
given to the most recent span tokens (H2O's recent window) 0.900 / +8.9%, 0.891 / +8.2%; H2O's
accumulated attention of every prompt row 0.840 / +15.6% (normalised by the rows that see a token: 0.863
/ +13.2%); attention summed over layers 0-3 / 2-3 0.889 / +9.2%, 0.891 / +9.5%; the max over the last
64 rows 0.885 / +7.9%; a trailing (forward-looking) pooling of 16 / 32 / 64 tokens 0.910 / +9.5%, 0.900
/ +17.4%, 0.832 / +29.7%. A cap on the prior (it may rank first at most a share of the kept tokens: those it
ranks highest by count, then attention; against spurious matches) was tried later on calibration by the
same rule, stated before the runs (ties within 0.002 agreement, i.e. one token in 512, go to the lower
perplexity): share 1.0 (no cap) 0.902 / +4.5%, 0.5 0.904 / +6.9%, 0.25 0.902 / +6.5%; no cap won and the
cap was not kept (never run on the evaluation texts). On the evaluation texts, looked at after the
choice, for the record: the last
token's n-gram n=4 changes nothing (0.898 / +20.1%: no text's last 4-gram recurs), n=1 gives 0.900 /
+10.7%.

Against issue 13's targets (0.6: agreement >= 0.90, perplexity within +8%): with ``lookup=16`` the
evaluation texts reach 0.8965 / +8.1% (both missed, by 2 of 512 predictions and 0.1 point); before the
dead positions were removed, with 10 fewer span tokens, 0.904 / +8.7% (agreement met). Per text the lookup
takes numpy from +88% to +2.6% and scipy from +63% to +2.3% (their continuations repeat bundled BSD
clauses that the prompt's last n-grams point at), transformers from +39% to +26%, but torch goes from
+1% to +38% (spurious matches take kept slots from tokens the continuation needs). Before it, the rule
reached 0.902 / +8.6% on calibration and 0.898 / +20.1% on the evaluation texts. Per text (eval,
rule at 0.6) the loss is concentrated in numpy (perplexity 3.18 -> 6.00), scipy (2.94 -> 4.79) and
transformers (11.9 -> 16.6): license texts that repeat earlier passages (bundled BSD/Apache clauses), so
the continuation copies tokens that the prompt's last token did not attend to: an attention score
cannot foresee them, which is what the lookup prior adds. Plain FastV at K=2 (0.797 / +43.8%) is beaten
at the same FLOPs by the rule (0.898 / +20.1%) and more by the rule with the lookup (0.904 / +8.7%; with
the dead positions removed 0.8965 / +8.1%).

Each run also prints its perplexity change per file and 95% intervals with the files drawn again
(paired bootstrap over the files, each with all its prompts, 10,000 draws; the evaluation texts are one
prompt per file). For the recommended settings (log:
benchmarks/results/decoder_fidelity_lookup.log, 2026-12-02): at 0.6 torch +38.0%, numpy +1.7%, scipy
-1.3%, matplotlib -0.2%, pillow -1.2%, typing_extensions -0.3%, transformers +26.9%, kiwisolver +7.8%;
interval +0.3% .. +18.3%, agreement 0.863 .. 0.924. At 0.4: +2.7% .. +19.6%, agreement 0.818 .. 0.900.
With eight texts both misses (0.0035 in agreement, 0.1 point in perplexity) are far inside the noise of
the choice of texts: ten more kept span tokens moved the agreement by -0.008 (below the target) and
the perplexity by -0.6 points (still above it).

Held-out texts (2026-12-02). Eight continuations cannot tell +8.1% from +8%; more text of the same kind
narrows the interval. HELDOUT was fixed before any run on it and nothing was set on it: the 576-token
windows 2-5 of the evaluation files (those that exist: transformers has windows 2-3, torch and
kiwisolver none), and windows 1-4 of scikit-learn's and sympy's license texts (2 and 3 exist), the only
installed license texts that are neither calibration texts nor copies of one or of an evaluation text
(the other distinct ones are Apache 2.0 copies, like transformers, regex and cuda-bindings, or NVIDIA's
SDK agreement, like nvidia-cudnn-cu13): 27 prompts from 8 files, 22 of them later windows of 6
evaluation files. ``all`` adds the 8 evaluation prompts: 35 prompts, 2,240 predictions, 10 files. The
intervals draw files, each with all its windows; with 8 or 10 files they are rough. Commands:
``--texts-from heldout --budgets 0.6,0.4 --layer auto --sinks 4 --pool 15 --lookup 16 --compare`` (about
13 minutes), the same without ``--lookup 16 --compare`` (the rule), and ``--texts-from all`` with the
first (about 22 minutes); logs and JSON in benchmarks/results/decoder_fidelity_heldout*, _all* (printed
by the first version of the held-out code, whose lines still say "per text" and "texts drawn again" for
what are files; "files weighted equally" below is ``per_file`` over the JSON's rows, which the benchmark
now prints too).

| texts | run | budget | stages | agreement | perplexity (full) | vs full | 95%, files drawn again |
|---|---|---|---|---|---|---|---|
| held-out (27) | **recommended** (rule, sinks 4, pool 15, lookup 16) | 0.6 | 4:240 | **0.9161** | 7.739 (7.448) | **+3.9%** | +2.0 .. +6.0%, 0.894 .. 0.939 |
| held-out | the rule without lookup | 0.6 | 4:240 | 0.9062 | 8.464 | +13.6% | +3.1 .. +33.1%, 0.862 .. 0.940 |
| held-out | plain FastV K=2 | 0.6 | 2:260 | 0.8356 | 9.479 | +27.3% | +8.2 .. +66.5%, 0.778 .. 0.873 |
| held-out | recommended | 0.4 | 3:133 | 0.8634 | 8.160 | +9.6% | +5.1 .. +14.5%, 0.840 .. 0.887 |
| held-out | the rule without lookup | 0.4 | 3:133 | 0.8490 | 8.907 | +19.6% | +8.9 .. +38.3%, 0.811 .. 0.887 |
| held-out | plain FastV K=2 | 0.4 | 2:149 | 0.7685 | 11.844 | +59.0% | +22.8 .. +119.3%, 0.723 .. 0.799 |
| all (35) | **recommended** | 0.6 | 4:240 | **0.9116** | 7.221 (6.888) | **+4.8%** | +2.3 .. +8.5%, 0.891 .. 0.932 |
| all | plain FastV K=2 | 0.6 | 2:260 | 0.8286 | 8.990 | +30.5% | +15.9 .. +61.0%, 0.784 .. 0.860 |
| all | recommended | 0.4 | 3:133 | 0.8629 | 7.563 | +9.8% | +5.8 .. +14.5%, 0.840 .. 0.885 |
| all | plain FastV K=2 | 0.4 | 2:149 | 0.7634 | 11.083 | +60.9% | +33.6 .. +103.9%, 0.725 .. 0.793 |

On the held-out windows the lookup prior earns its place (+13.6% -> +3.9% at 0.6: sympy +91% -> +0.2%,
scikit-learn +20% -> +2.0%, pillow +17% -> +2.0%; it costs numpy +4.6% -> +7.8%, scipy -1.6% -> +2.3%
and typing_extensions +0.9% -> +7.0%). On all 35 prompts the point estimates of the recommended setting
meet issue 13's targets at 0.6: agreement 0.912 (>= 0.90) and perplexity +4.8% (within +8%), against
plain FastV's 0.829 / +30.5% at the same FLOPs. Pooled over predictions, the five long licenses count 5
prompts each and torch and kiwisolver one each; with the 10 files weighted equally the figures are 0.909
/ +7.4% (plain FastV 0.828 / +33.2%; at 0.4 0.865 / +11.4%). The intervals reach past both targets
(+8.5%, agreement 0.891), so these data do not rule out a miss on another draw of files, and the
eight-text evaluation above still misses both (0.8965 / +8.1%). Torch's text (+38%) stays the worst case.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.decoders import smollm2, smollm2_tokenizer
from tokencompile.decoder import Span, compile_decoder, reuse_traces, teacher_forced_logits

TEXTS = ["torch", "numpy", "scipy", "matplotlib", "pillow", "typing_extensions", "transformers", "kiwisolver"]
# calibration texts (--texts-from calibration): other license files, none of them one of the TEXTS
CALIBRATION = ["cuda-bindings", "fonttools", "nvidia-cublas", "nvidia-cudnn-cu13", "python-dateutil", "regex", "ruff",
               "setuptools"]
# held-out texts (--texts-from heldout), fixed before any run on them: the 576-token windows 2-5 of each of
# TEXTS (those that exist: torch and kiwisolver have one), and windows 1-4 of the only other installed license
# texts that are neither a calibration text nor a copy of one or of TEXTS (the rest are Apache 2.0 copies,
# like transformers / regex / cuda-bindings, or NVIDIA's SDK agreement, like nvidia-cudnn-cu13)
HELDOUT = [(TEXTS, range(1, 5)), (["scikit-learn", "sympy"], range(4))]
PROMPT, CONTINUATION, PROTECTED = 512, 64, 64


def license_token_ids(tokenizer, distributions: list[str], needed: int,
                      windows: range = range(1)) -> tuple[torch.Tensor, list[str]]:
    """Each distribution's first license file (sorted by path) with at least ``needed`` tokens, cut into
    consecutive ``needed``-token windows; the rows are the ``windows`` of them that exist."""
    rows, sources = [], []
    for name in distributions:
        files = sorted(str(f) for f in importlib.metadata.distribution(name).files or []
                       if os.path.basename(str(f)).upper().startswith(("LICENSE", "COPYING")))
        for file in files:
            path = importlib.metadata.distribution(name).locate_file(file)
            with open(path, errors="replace") as text:
                ids = tokenizer(text.read()).input_ids
            if len(ids) >= needed:
                for window in windows:
                    if (window + 1) * needed <= len(ids):
                        rows.append(ids[window * needed:(window + 1) * needed])
                        sources.append(f"{name}:{file}" + (f"#{window + 1}" if windows != range(1) else ""))
                break
    return torch.tensor(rows), sources


def fidelity(logits: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor) -> dict:
    """Pooled top-1 agreement and perplexity, and each text's (every text has CONTINUATION tokens)."""
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean(1)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
    return {"top1_agreement": agreement.mean().item(), "perplexity": nll.mean().exp().item(),
            "per_text_agreement": agreement.tolist(), "per_text_nll": nll.tolist()}


def bootstrap_interval(row: dict, full: dict, groups: list[str], draws: int = 10000, seed: int = 0) -> dict:
    """95% intervals of the perplexity change and the agreement when the texts are drawn again with
    replacement (paired: one draw for the run and the full model): how much the figures owe to which
    texts were chosen. Rows of one group (windows of one file) are drawn together."""
    nll, base = torch.tensor(row["per_text_nll"]), torch.tensor(full["per_text_nll"])
    agreement = torch.tensor(row["per_text_agreement"])
    names = list(dict.fromkeys(groups))
    member = torch.tensor([names.index(g) for g in groups])
    draw = torch.randint(0, len(names), (draws, len(names)), generator=torch.Generator().manual_seed(seed))
    counts = torch.zeros(draws, len(names)).scatter_add_(1, draw, torch.ones(draws, len(names)))[:, member]
    counts = counts / counts.sum(1, keepdim=True)
    change = (counts @ nll - counts @ base).exp() - 1
    quantiles = torch.tensor([0.025, 0.975])
    return {"perplexity_change_95": change.quantile(quantiles).tolist(),
            "agreement_95": (counts @ agreement).quantile(quantiles).tolist()}


def per_file(row: dict, full: dict, groups: list[str]) -> tuple[dict, dict]:
    """Each file's mean log-perplexity change against the full model and its mean agreement, over its
    windows (``groups`` names each row's file)."""
    nll, agreement = {}, {}
    for name in dict.fromkeys(groups):
        rows = [i for i, g in enumerate(groups) if g == name]
        nll[name] = sum(row["per_text_nll"][i] - full["per_text_nll"][i] for i in rows) / len(rows)
        agreement[name] = sum(row["per_text_agreement"][i] for i in rows) / len(rows)
    return nll, agreement


def _causal(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)[None, None]


@torch.no_grad()
def eager_staged_logits(lm, ids: torch.Tensor, stages, span_end: int, probes: int = 1, sinks: int = 0,
                        pool: int = 1) -> torch.Tensor:
    """[B, CONTINUATION, V]: the staged reduction as one eager pass over prompt + continuation (``--eager``).
    Before each stage layer L the prompt rows that reached layer L-1 are scored there (last prompt
    rows' attention, pooled) and the top span rows stay; continuation rows always stay. By causality
    this equals the compiled prefill + teacher-forced decode on its caches (checked: logits within 1e-4)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    batch, n = ids.shape
    hidden = lm.model.embed_tokens(ids)
    positions = torch.arange(n)[None].expand(batch, n)
    kept_after = dict(stages)
    for index, layer in enumerate(lm.model.layers):
        cos_sin = lm.model.rotary_emb(hidden, positions)
        if index + 1 in kept_after:
            attention = layer.self_attn
            x = layer.input_layernorm(hidden)
            shape = (*x.shape[:2], -1, attention.head_dim)
            q = attention.q_proj(x).view(shape).transpose(1, 2)
            k = attention.k_proj(x).view(shape).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, *cos_sin)
            k = repeat_kv(k, attention.num_key_value_groups)
            rows = int((positions[0] < PROMPT).sum())
            logits = q[:, :, rows - probes:rows] @ k[:, :, :rows].transpose(-2, -1) * attention.scaling
            score = (logits + _causal(rows)[..., rows - probes:, :]).softmax(-1).mean((1, 2))
            score = torch.nn.functional.avg_pool1d(score[:, None], pool, 1, pool // 2, count_include_pad=False)[:, 0]
        hidden = layer(hidden, attention_mask=_causal(hidden.shape[1]), position_embeddings=cos_sin)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        if index + 1 in kept_after:
            prompt_positions = positions[:, :rows]
            removable = (prompt_positions < span_end) & (prompt_positions >= sinks) & (prompt_positions < PROMPT - 1)
            score = score.masked_fill(~removable, float("inf"))
            n_keep = rows - int(removable[0].sum()) + kept_after[index + 1]
            kept = score.sort(dim=1, descending=True, stable=True).indices[:, :n_keep].sort(dim=1).values
            kept = torch.cat([kept, torch.arange(rows, positions.shape[1]).expand(batch, -1)], 1)
            hidden = hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1]))
            positions = positions.gather(1, kept)
    rows = int((positions[0] < PROMPT).sum())
    return lm.lm_head(lm.model.norm(hidden))[:, rows - 1:-1]


def eager_plan(lm, prompt: torch.Tensor, budget: float, span: Span, options: dict) -> dict:
    """The stages compile_decoder would choose (from the cost model; no rewrite), as a report."""
    from tokencompile.decoder import pyramid_layers
    from tokencompile.decoder.prefill import (
        Stage,
        auto_layer,
        choose_pyramid,
        choose_schedule,
        stage_schedule,
        trace_prefill,
    )

    example = prompt[:1]
    traced = trace_prefill(lm, example, None)  # the cost model compile_decoder plans with
    analysis, cost = traced.analysis, traced.cost
    removable = int((span.removable(example) & (torch.arange(PROMPT) >= options["sinks"])).sum())
    layer = options["layer"]
    if layer is None:
        layer = pyramid_layers(analysis.layers) if options["method"] == "pyramiddrop" else 2
    if layer == "auto":
        layer = auto_layer(cost, budget)
    if isinstance(layer, int):
        k, removed = choose_schedule(cost, budget, layer, removable)
        stages = [Stage(k, removable - removed)]
    else:
        stages = choose_pyramid(cost, budget, layer, removable)
    schedule = stage_schedule(analysis.layers, removable, stages)
    return {"stages": [{"layer": s.layer, "span_kept": s.kept} for s in stages], "span_tokens_kept": stages[-1].kept,
            "span_tokens_removable": removable, "tokens_per_layer": cost.tokens_per_block(schedule),
            "flops_ratio": cost.flops(schedule) / cost.original}


def _layers(text: str):
    if text == "auto":
        return "auto"
    layers = tuple(int(x) for x in text.split(","))
    return layers[0] if len(layers) == 1 else layers


def _row(name: str, budget, logits, full, continuation, report: dict, seconds: tuple) -> dict:
    stages = " ".join(f"{s['layer']}:{s['span_kept']}" for s in report["stages"]) or "-"
    return {"budget": budget, "name": name, **fidelity(logits, full, continuation), "flops_ratio": report["flops_ratio"],
            "stages": stages, "span_kept": f"{report['span_tokens_kept']}/{report['span_tokens_removable']}",
            "tokens_per_layer": report["tokens_per_layer"], "compile_seconds": round(seconds[0], 1),
            "eval_seconds": round(seconds[1], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0.6,0.4")
    parser.add_argument("--method", default="fastv", help="fastv, pyramiddrop, or a comma-separated list that may "
                        "also hold the span scores dart, divprune, zipcache, random (one run each)")
    parser.add_argument("--option", action="append", default=[], help="KEY=VALUE, an option of the span scores")
    parser.add_argument("--layer", default=None, help="fastv's K (moved earlier if the budget needs it), or stage "
                        "layers 4,8,16 (the pyramid's ratio from the budget), or auto (the compiler's schedule "
                        "rule); default: the method's (fastv 2, pyramiddrop depth/4 * (1,2,3))")
    parser.add_argument("--probes", type=int, default=1, help="score by the mean attention row of the last P "
                        "prompt tokens (1: FastV's last token)")
    parser.add_argument("--sinks", type=int, default=0, help="the first prompt tokens never removed")
    parser.add_argument("--pool", type=int, default=1, help="average the score over this many neighbours (odd)")
    parser.add_argument("--lookup", type=int, default=0, help="prompt-lookup prior over the n-grams of the last N "
                        "prompt tokens (fastv / pyramiddrop)")
    parser.add_argument("--ahead", type=int, default=64, help="how far past the prompt a lookup match reaches")
    parser.add_argument("--compare", action="store_true", help="also run plain FastV (K=2, last token, no sinks) "
                        "at each budget")
    parser.add_argument("--texts", type=int, default=None, help="the first N prompts only (exploration)")
    parser.add_argument("--texts-from", default="evaluation", choices=["evaluation", "calibration", "heldout", "all"],
                        help="TEXTS, the CALIBRATION texts the schedule rule was set on, the HELDOUT windows, or "
                        "all = evaluation + heldout")
    parser.add_argument("--eager", action="store_true", help="stages from the cost model, logits from one eager "
                        "staged pass (fast exploration; equal to the compiled program) instead of compiling")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)

    tokenizer = smollm2_tokenizer()
    sets = {"evaluation": [(TEXTS, range(1))], "calibration": [(CALIBRATION, range(1))], "heldout": HELDOUT,
            "all": [(TEXTS, range(1)), *HELDOUT]}[args.texts_from]
    parts = [license_token_ids(tokenizer, names, PROMPT + CONTINUATION, windows) for names, windows in sets]
    ids, sources = torch.cat([p[0] for p in parts])[:args.texts], [s for p in parts for s in p[1]][:args.texts]
    prompt, continuation = ids[:, :PROMPT], ids[:, PROMPT:]
    print(f"{len(sources)} prompts: {', '.join(sources)}")
    model = smollm2().model
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, PROMPT - 1:-1]
    results = [{"budget": None, "name": "full model, one forward", **fidelity(full, full, continuation)}]
    if not args.eager:
        loop = teacher_forced_logits(model, prompt, continuation)
        results.append({"budget": 1.0, "name": "no reduction, prefill + decode loop",
                        **fidelity(loop, full, continuation)})

    span = Span(0, PROMPT - PROTECTED)
    layer = _layers(args.layer) if args.layer else None
    runs = []
    methods = args.method.split(",")
    span_methods = [m for m in methods if m not in ("fastv", "pyramiddrop")]
    if span_methods and (args.probes != 1 or args.pool != 1 or args.lookup):
        sys.exit(f"--probes, --pool and --lookup shape fastv / pyramiddrop only, not {', '.join(span_methods)}")
    if args.option and len(span_methods) != 1:
        sys.exit("--option applies to one span method: give one of dart, divprune, zipcache, random")
    if any("=" not in pair for pair in args.option):
        sys.exit("--option takes KEY=VALUE")
    for method in methods:
        if method in ("fastv", "pyramiddrop"):
            if args.eager and args.lookup:
                sys.exit("--eager has no --lookup: run it compiled")
            lookup = f" lookup={args.lookup} ahead={args.ahead}" if args.lookup else ""
            runs.append((f"{method} layer={args.layer or 'default'} probes={args.probes} sinks={args.sinks} "
                         f"pool={args.pool}{lookup}", {"method": method, "layer": layer, "probes": args.probes,
                                                       "sinks": args.sinks, "pool": args.pool, "lookup": args.lookup,
                                                       "ahead": args.ahead}))
        elif args.eager:
            sys.exit(f"--eager runs fastv and pyramiddrop only, not {method}")
        else:
            options = dict(pair.split("=", 1) for pair in args.option)
            runs.append((f"{method} layer={args.layer or 'default'} sinks={args.sinks} {' '.join(args.option)}".strip(),
                         {"method": method, "layer": layer, "sinks": args.sinks, "options": options}))
    if args.compare:
        runs.append(("plain fastv K=2", {"method": "fastv", "layer": 2}))
    with reuse_traces():  # every compile is of the same model on the same prompts: one export
        for budget in [float(b) for b in args.budgets.split(",")]:
            for run_name, options in runs:
                started = time.perf_counter()
                if args.eager:
                    options = {"layer": None, "probes": 1, "sinks": 0, "pool": 1, **options}
                    options.pop("lookup", None), options.pop("ahead", None)
                    report = eager_plan(model, prompt, budget, span, options)
                    compiled = time.perf_counter() - started
                    logits = eager_staged_logits(model, ids, [(s["layer"], s["span_kept"]) for s in report["stages"]],
                                                 span.length, options["probes"], options["sinks"], options["pool"])
                else:
                    program = compile_decoder(model, prompt, budget=budget, span=span, **options)
                    compiled = time.perf_counter() - started
                    logits, report = teacher_forced_logits(program, prompt, continuation), program.report
                seconds = (compiled, time.perf_counter() - started - compiled)
                results.append(_row(run_name + " (eager)" * args.eager, budget, logits, full, continuation, report,
                                    seconds))
                print(f"budget {budget} {run_name}: agreement {results[-1]['top1_agreement']:.4f}, perplexity "
                      f"{results[-1]['perplexity']:.3f}, stages {results[-1]['stages']}", flush=True)

    print(f"SmolLM2-135M-Instruct, {len(sources)} prompts of {PROMPT} tokens (last {PROTECTED} protected), "
          f"{CONTINUATION}-token teacher-forced continuation")
    print("| run | budget | FLOPs ratio | stages (layer:span kept) | top-1 agreement | perplexity | vs full |")
    print("|---|---|---|---|---|---|---|")
    base = results[0]["perplexity"]
    for r in results:
        print(f"| {r['name']} | {r['budget'] if r['budget'] is not None else '-'} | "
              f"{r.get('flops_ratio', 1.0):.3f} | {r.get('stages', '-')} | "
              f"{r['top1_agreement']:.4f} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.1f}% |")
    for r in results:
        if "tokens_per_layer" in r:
            print(f"budget {r['budget']} {r['name']}: tokens per layer {r['tokens_per_layer']}")
    groups = [source.split(":")[0] for source in sources]
    for r in results[1:]:
        r.update(bootstrap_interval(r, results[0], groups))
        nll, agreement = per_file(r, results[0], groups)
        low, high = (100 * x for x in r["perplexity_change_95"])
        print(f"budget {r['budget']} {r['name']}: perplexity change per file "
              f"{', '.join(f'{name} {100 * (math.exp(x) - 1):+.1f}%' for name, x in nll.items())}; files drawn "
              f"again (95%): {low:+.1f}% .. {high:+.1f}%, agreement {r['agreement_95'][0]:.3f} .. "
              f"{r['agreement_95'][1]:.3f}; files weighted equally: perplexity "
              f"{100 * (math.exp(sum(nll.values()) / len(nll)) - 1):+.1f}%, "
              f"agreement {sum(agreement.values()) / len(agreement):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "texts": sources, "prompt": PROMPT, "continuation": CONTINUATION, "protected": PROTECTED,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
