"""Whether the consumer's group metadata names a live membership, checked before a transaction
sends offsets with it.

librdkafka resets the generation to -1 when the coordinator answers ``ILLEGAL_GENERATION`` and the
member id to ``""`` on ``UNKNOWN_MEMBER_ID``, and keeps them so until the application has served
the loss of its partitions and the consumer has rejoined. The group coordinator checks a
``TxnOffsetCommit``'s member and generation only where they are set: generation -1 with no member
id is what a producer outside any consumer group sends, and the broker accepts it (Kafka 4.1.1,
``tests/integration/test_zombie_commit.py``) even while another member owns the partitions, e.g.
after every session expired behind a frozen broker and the group formed again. Offsets sent
with such metadata would commit partitions that another member has already started again from the
previous commit: two copies of the same results that a ``read_committed`` reader sees, and that
the fencing of KIP-447 cannot catch because nothing identifies the sender as stale.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_MAGIC = b"CGMDv2:"
"""librdkafka's serialised ``rd_kafka_consumer_group_metadata_t`` (what the Python client hands
out): the magic, the generation as a host-order int32, then the group id and the member id, each
NUL-terminated, then the group instance id."""
_GENERATION = struct.Struct("=i")


@dataclass(frozen=True, slots=True)
class Membership:
    """The generation and member id a consumer's group metadata carries."""

    generation: int
    member_id: str

    @property
    def live(self) -> bool:
        """True when both are set, i.e. the group coordinator will check them."""
        return self.generation >= 0 and bool(self.member_id)


def read_membership(metadata: object) -> Membership | None:
    """The membership in librdkafka's serialised group metadata; None for another format."""
    if not isinstance(metadata, bytes) or not metadata.startswith(_MAGIC):
        return None
    start = len(_MAGIC)
    end = start + _GENERATION.size
    if len(metadata) < end:
        return None
    (generation,) = _GENERATION.unpack(metadata[start:end])
    _group, sep, rest = metadata[end:].partition(b"\0")
    if not sep:
        return None
    member, sep, _rest = rest.partition(b"\0")
    if not sep:
        return None
    return Membership(generation, member.decode("utf-8", errors="replace"))
