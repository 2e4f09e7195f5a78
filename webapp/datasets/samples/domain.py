"""Sample data for domain adaptation: the maintenance manual of a (made-up) line of valves.

Each document is one valve's page, written in the manual's fixed house style: its code, size and
body material, the inspection interval, the bolt torque, the packing to replace and the log entry
to make. The vocabulary and phrasing are new to a general model and regular, so the held-out
pages' perplexity falls within a few dozen LoRA steps. Deterministic, pure Python.
"""

from __future__ import annotations

import random

MATERIALS = ["ductile iron", "carbon steel", "stainless steel 316", "bronze", "duplex steel", "PVC-U"]
SEALS = ["graphite", "PTFE", "aramid", "EPDM", "Viton"]
SERVICES = ["cooling water", "steam condensate", "brine", "compressed air", "potable water", "fuel oil"]
SIZES = [25, 40, 50, 65, 80, 100, 150, 200]
COUNT = 80


def rows() -> list[dict[str, str]]:
    rng = random.Random(7)
    return [{"text": _page(number, rng)} for number in range(1, COUNT + 1)]


def _page(number: int, rng: random.Random) -> str:
    size, material, seal, service = rng.choice(SIZES), rng.choice(MATERIALS), rng.choice(SEALS), rng.choice(SERVICES)
    hours, torque = rng.choice([500, 1000, 2000, 4000]), 20 + 5 * rng.randrange(12)
    code = f"KV-{size}-{number:03d}"
    return (
        f"# Valve {code}\n\n"
        f"Kelvar gate valve {code}, DN{size}, body of {material}, in {service} service.\n\n"
        f"Inspection: every {hours} operating hours, check the stem for leaks and the handwheel for play.\n"
        f"Bonnet bolts: torque to {torque} Nm in a star pattern, in three passes.\n"
        f"Packing: if the stem leaks, replace the {seal} packing rings and re-torque the gland nuts to "
        f"{torque // 2} Nm.\n"
        f"Log: record the date, the running hours and the torque in the {code} page of the valve log.\n"
    )
