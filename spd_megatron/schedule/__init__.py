"""Decode schedules. ``get_schedule_class(name)`` picks one; ``register_schedule`` adds yours."""

from spd_megatron.schedule.base import (  # noqa: F401
    GenerationResult,
    SpeculativeSchedule,
    get_schedule_class,
    register_schedule,
    schedule_names,
)
from spd_megatron.schedule.state import DecodeState, Verdict  # noqa: F401
import spd_megatron.schedule.autoregressive  # noqa: F401,E402  (registers "autoregressive")
import spd_megatron.schedule.spd  # noqa: F401,E402  (registers "spd")
