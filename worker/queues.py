"""How many images wait in a broker queue: the producers' backpressure and the metrics gauge.

Each inference message names its image count in a header (``sortline_images``); a Lua script
adds them up inside Redis over the queue's lists (kombu keeps one list per priority step),
so counting costs one round trip and no message leaves the broker. A message without the
header (an older producer) counts as one image.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

IMAGES_HEADER = "sortline_images"
PRIORITY_STEPS = (0, 3, 6, 9)  # kombu's Redis transport: one list per step
_SEP = "\x06\x16"
_COUNT = """
local n = 0
for _, key in ipairs(KEYS) do
  for _, m in ipairs(redis.call('LRANGE', key, 0, -1)) do
    n = n + (tonumber(string.match(m, '"sortline_images":%s*(%d+)')) or 1)
  end
end
return n
"""


def queue_keys(queue: str) -> list[str]:
    """The Redis lists that hold *queue*'s waiting messages."""
    return [queue if p == 0 else f"{queue}{_SEP}{p}" for p in PRIORITY_STEPS]


def queued_images(queue: str, *, client=None) -> int:
    """Images in the messages waiting on *queue* (taken but unacknowledged ones excluded)."""
    if client is not None:
        return int(client.eval(_COUNT, len(PRIORITY_STEPS), *queue_keys(queue)))
    from worker.app import app

    with app.connection_for_read() as conn:
        return queued_images(queue, client=conn.default_channel.client)
