"""Layout parser contract."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llumnix_kv_core.layout import CacheGroupDescription
    from llumnix_kv_core.layout import KVLayout


class LayoutParser(abc.ABC):
    """Recognises one family of engine cache descriptions.

    ``parse`` is called once per cache group at KV-cache registration, in the
    engine worker process. It returns a :class:`KVLayout` (every offset derived
    from the description's shapes and strides, none hard-coded) or None when the
    description belongs to another family. It raises LayoutError when it
    recognises the family but cannot support this instance (and says why).
    """

    name: str

    @abc.abstractmethod
    def parse(self, desc: CacheGroupDescription) -> KVLayout | None: ...
