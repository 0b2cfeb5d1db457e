# Included by _fastpath.pyx.  Endpoint selection: the fixed seeded hash, the
# 5-tuple flow hash, Maglev (Katran MaglevHashV2 weights) and a flat ClientIP
# affinity table.  The twin is kproxy/_fastpath_select_py.py; the docstrings
# there are the specification, these are held to them by the parity tests.

from libc.stdlib cimport malloc, calloc, free


cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char* src, void* dst)

cdef extern from "<sys/socket.h>" nogil:
    enum:
        AF_INET
        AF_INET6

cdef uint64_t _MASK64 = 0xFFFFFFFFFFFFFFFF
MAGLEV_OFFSET_SEED = 0x6B70726F78796D31
MAGLEV_SKIP_SEED = 0x6B70726F78796D32
FLOW_SEED = 0x6B70726F78796633
cdef uint64_t _OFFSET_SEED = 0x6B70726F78796D31
cdef uint64_t _SKIP_SEED = 0x6B70726F78796D32
cdef uint64_t _FLOW_SEED = 0x6B70726F78796633
# Only for the affinity table's slot index; not part of any cross-node contract.
cdef uint64_t _AFFINITY_SEED = 0x6B70726F78796134


cdef inline uint64_t _hash64(const uint8_t* p, size_t n, uint64_t seed) noexcept nogil:
    cdef uint64_t h = 0xCBF29CE484222325ULL ^ seed
    cdef size_t i
    for i in range(n):
        h = (h ^ p[i]) * 0x100000001B3ULL
    h ^= h >> 33
    h *= 0xFF51AFD7ED558CCDULL
    h ^= h >> 33
    h *= 0xC4CEB9FE1A85EC53ULL
    h ^= h >> 33
    return h


def hash64(object data, uint64_t seed=0):
    """FNV-1a 64 seeded through the offset basis, finished with MurmurHash3 ``fmix64``."""
    cdef Py_buffer view
    cdef Py_ssize_t n = 0
    cdef bint held = False
    cdef const uint8_t* p = _rbuf(data, &view, &n, &held)
    cdef uint64_t h = _hash64(p, n, seed)
    if held:
        PyBuffer_Release(&view)
    return h


cdef int _pack_ip(object ip, uint8_t* out) except -1:
    """Write ``ip`` (text or packed bytes) into ``out``; returns its length 4 or 16."""
    cdef bytes text
    cdef const char* c
    cdef Py_ssize_t n = 0
    if isinstance(ip, bytes):
        n = len(<bytes>ip)
        if n != 4 and n != 16:
            raise ValueError(f"packed address must be 4 or 16 bytes, got {n}")
        memcpy(out, <const char*><bytes>ip, n)
        return <int>n
    if not isinstance(ip, str):
        raise TypeError(f"an IP must be str or bytes, not {type(ip).__name__}")
    text = (<str>ip).encode("ascii")
    c = text
    if b"\0" in text:
        raise ValueError("embedded null character")
    if b":" in text:
        if inet_pton(AF_INET6, c, out) == 1:
            return 16
    elif inet_pton(AF_INET, c, out) == 1:
        return 4
    raise ValueError(f"not an IP address: {ip!r}")


def client_key(ip):
    """An IP as packed bytes (4 or 16); raises ValueError for anything else."""
    cdef uint8_t buf[16]
    cdef int n = _pack_ip(ip, buf)
    return PyBytes_FromStringAndSize(<char*>buf, n)


cdef inline uint64_t _flow_hash_c(
    uint8_t proto, const uint8_t* src, const uint8_t* dst, int alen, uint16_t sport, uint16_t dport
) noexcept nogil:
    # Serialisation shared with the twin: proto | sport | dport | src | dst.
    cdef uint8_t key[37]
    key[0] = proto
    key[1] = sport >> 8
    key[2] = sport & 0xFF
    key[3] = dport >> 8
    key[4] = dport & 0xFF
    memcpy(key + 5, src, alen)
    memcpy(key + 5 + alen, dst, alen)
    return _hash64(key, 5 + 2 * alen, _FLOW_SEED)


cdef uint64_t _flow_hash_obj(object proto, object src, object sport, object dst, object dport) except? 0:
    cdef uint8_t s[16]
    cdef uint8_t d[16]
    cdef uint8_t key[37]
    cdef long p = proto, sp = sport, dp = dport
    cdef int ls, ld
    if not (0 <= p <= 0xFF and 0 <= sp <= 0xFFFF and 0 <= dp <= 0xFFFF):
        raise ValueError("proto must fit 8 bits and ports 16 bits")
    ls = _pack_ip(src, s)
    ld = _pack_ip(dst, d)
    key[0] = <uint8_t>p
    key[1] = <uint8_t>(sp >> 8)
    key[2] = <uint8_t>(sp & 0xFF)
    key[3] = <uint8_t>(dp >> 8)
    key[4] = <uint8_t>(dp & 0xFF)
    memcpy(key + 5, s, ls)
    memcpy(key + 5 + ls, d, ld)
    return _hash64(key, 5 + ls + ld, _FLOW_SEED)


def flow_hash(proto, src, sport, dst, dport):
    """Hash of a 5-tuple; addresses packed (or text), ports and proto as integers."""
    return _flow_hash_obj(proto, src, sport, dst, dport)


cdef bint _is_prime(uint64_t n) noexcept nogil:
    cdef uint64_t i = 2
    if n < 2:
        return False
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


cdef int _maglev_build(
    int32_t* table, uint32_t m, const int32_t* live, Py_ssize_t nlive,
    const uint64_t* offsets, const uint64_t* skips, const uint64_t* weights, uint64_t max_weight,
) noexcept nogil:
    # Katran's MaglevHashV2; returns -1 when out of memory.
    cdef uint64_t* nxt = <uint64_t*>calloc(nlive, sizeof(uint64_t))
    cdef uint64_t* cum = <uint64_t*>calloc(nlive, sizeof(uint64_t))
    cdef uint64_t filled = 0, cur
    cdef Py_ssize_t j
    cdef uint32_t k
    if nxt == NULL or cum == NULL:
        free(nxt)
        free(cum)
        return -1
    for k in range(m):
        table[k] = -1
    while True:
        for j in range(nlive):
            cum[j] += weights[j]
            if cum[j] < max_weight:
                continue
            cum[j] -= max_weight
            cur = (offsets[j] + nxt[j] * skips[j]) % m
            while table[cur] >= 0:
                nxt[j] += 1
                cur = (offsets[j] + nxt[j] * skips[j]) % m
            table[cur] = live[j]
            nxt[j] += 1
            filled += 1
            if filled == m:
                free(nxt)
                free(cum)
                return 0


cdef class Maglev:
    """A Maglev lookup table (see the twin for the contract)."""

    cdef tuple _backends
    cdef tuple _weights
    cdef int32_t* _table
    cdef uint32_t _m

    def __cinit__(self):
        self._table = NULL

    def __dealloc__(self):
        free(self._table)

    def __init__(self, backends, weights=None, table_size=65537):
        cdef tuple names = tuple(backends)
        cdef tuple ws
        cdef Py_ssize_t n, i, nlive = 0
        cdef uint64_t m64, max_weight = 0
        cdef int32_t* live = NULL
        cdef uint64_t* offsets = NULL
        cdef uint64_t* skips = NULL
        cdef uint64_t* wts = NULL
        cdef bytes key
        cdef int rc = 0
        if table_size < 2 or table_size >= 2 ** 31 or not _is_prime(<uint64_t>table_size):
            raise ValueError(f"table_size must be a prime below 2**31, got {table_size}")
        m64 = table_size
        ws = tuple(1 for _ in names) if weights is None else tuple(int(w) for w in weights)
        if len(ws) != len(names):
            raise ValueError(f"{len(names)} backends but {len(ws)} weights")
        for w in ws:
            if w < 0 or w >= 2 ** 31:
                raise ValueError("weights must be in [0, 2**31)")
        n = len(names)
        self._backends = names
        self._weights = ws
        self._m = <uint32_t>m64
        free(self._table)
        self._table = NULL
        for i in range(n):
            if <long>ws[i] > 0:
                nlive += 1
        if nlive == 0:
            return
        self._table = <int32_t*>malloc(m64 * sizeof(int32_t))
        live = <int32_t*>malloc(nlive * sizeof(int32_t))
        offsets = <uint64_t*>malloc(nlive * sizeof(uint64_t))
        skips = <uint64_t*>malloc(nlive * sizeof(uint64_t))
        wts = <uint64_t*>malloc(nlive * sizeof(uint64_t))
        try:
            if self._table == NULL or live == NULL or offsets == NULL or skips == NULL or wts == NULL:
                raise MemoryError()
            nlive = 0
            for i in range(n):
                if <long>ws[i] <= 0:
                    continue
                key = (<str>names[i]).encode("utf-8")
                live[nlive] = <int32_t>i
                offsets[nlive] = _hash64(<const uint8_t*><char*>key, len(key), _OFFSET_SEED) % m64
                skips[nlive] = _hash64(<const uint8_t*><char*>key, len(key), _SKIP_SEED) % (m64 - 1) + 1
                wts[nlive] = <uint64_t><long>ws[i]
                if wts[nlive] > max_weight:
                    max_weight = wts[nlive]
                nlive += 1
            if nlive == 1:
                for i in range(<Py_ssize_t>m64):
                    self._table[i] = live[0]
            else:
                with nogil:
                    rc = _maglev_build(self._table, self._m, live, nlive, offsets, skips, wts, max_weight)
                if rc != 0:
                    raise MemoryError()
        except BaseException:
            free(self._table)
            self._table = NULL
            raise
        finally:
            free(live)
            free(offsets)
            free(skips)
            free(wts)

    @property
    def backends(self):
        return self._backends

    @property
    def weights(self):
        return self._weights

    @property
    def table_size(self):
        return self._m

    def __len__(self):
        return len(self._backends)

    def table(self):
        """The slot → backend index table (empty when no backend has weight)."""
        cdef uint32_t i
        if self._table == NULL:
            return []
        return [self._table[i] for i in range(self._m)]

    cpdef long lookup(self, uint64_t h) except -1:
        """Index of the backend owning hash ``h`` (a non-negative 64-bit integer)."""
        if self._table == NULL:
            raise LookupError("no backends")
        return self._table[h % self._m]

    def select(self, key):
        """The backend for ``key``: raw bytes, or a 5-tuple ``(proto, src, sport, dst, dport)``."""
        cdef uint64_t h
        cdef const uint8_t* p
        if self._table == NULL:
            raise LookupError("no backends")
        if isinstance(key, bytes):
            p = <const uint8_t*><char*><bytes>key
            h = _hash64(p, len(<bytes>key), _FLOW_SEED)
        else:
            proto, src, sport, dst, dport = key
            h = _flow_hash_obj(proto, src, sport, dst, dport)
        return self._backends[self._table[h % self._m]]

    def lookup_packet(self, object buf):
        """Backend index for the packet ``buf`` (IP header first), or ``-status`` of the parse.

        Parse, flow hash and lookup in C without a Python object per packet.
        """
        cdef _Parsed rec
        cdef int status
        cdef Py_buffer view
        cdef Py_ssize_t n = 0
        cdef bint held = False
        cdef const uint8_t* p
        if self._table == NULL:
            raise LookupError("no backends")
        p = _rbuf(buf, &view, &n, &held)
        status = _parse_c(p, n, &rec)
        if held:
            PyBuffer_Release(&view)
        if status != 0:
            return -status
        return self._table[
            _flow_hash_c(rec.proto, rec.src, rec.dst, rec.alen, rec.sport, rec.dport) % self._m
        ]


ctypedef struct _AffSlot:
    uint8_t used
    uint8_t klen
    uint8_t key[16]
    int32_t backend
    double last_used


cdef class ClientIPAffinity:
    """ClientIP affinity records in a flat open-addressing table (see the twin)."""

    cdef double _timeout
    cdef _AffSlot* _slots
    cdef Py_ssize_t _cap
    cdef Py_ssize_t _count
    cdef list _names
    cdef dict _ids

    def __cinit__(self):
        self._slots = NULL

    def __dealloc__(self):
        free(self._slots)

    def __init__(self, timeout):
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self._timeout = float(timeout)
        self._names = []
        self._ids = {}
        self._alloc(64)

    cdef int _alloc(self, Py_ssize_t cap) except -1:
        cdef _AffSlot* slots = <_AffSlot*>calloc(cap, sizeof(_AffSlot))
        if slots == NULL:
            raise MemoryError()
        free(self._slots)
        self._slots = slots
        self._cap = cap
        self._count = 0
        return 0

    @property
    def timeout(self):
        return self._timeout

    def __len__(self):
        return self._count

    cdef Py_ssize_t _find(self, const uint8_t* key, int klen) noexcept nogil:
        # Linear probing over a power-of-two table that is never more than half full.
        cdef Py_ssize_t mask = self._cap - 1
        cdef Py_ssize_t i = <Py_ssize_t>(_hash64(key, klen, _AFFINITY_SEED) & <uint64_t>mask)
        cdef _AffSlot* s
        while True:
            s = &self._slots[i]
            if not s.used:
                return i
            if s.klen == klen and memcmp(s.key, key, klen) == 0:
                return i
            i = (i + 1) & mask

    cdef int _insert(self, const uint8_t* key, int klen, int32_t backend, double now) except -1:
        cdef Py_ssize_t i
        cdef _AffSlot* s
        if (self._count + 1) * 2 > self._cap:
            self._rebuild(self._cap * 2, 0, -1, -1)
        i = self._find(key, klen)
        s = &self._slots[i]
        if not s.used:
            s.used = 1
            s.klen = <uint8_t>klen
            memcpy(s.key, key, klen)
            self._count += 1
        s.backend = backend
        s.last_used = now
        return 0

    cdef Py_ssize_t _rebuild(self, Py_ssize_t cap, bint expire, double now, int32_t drop) except -1:
        # Reinsert the records that survive; deletions happen only here (no tombstones).
        cdef _AffSlot* old = self._slots
        cdef Py_ssize_t oldcap = self._cap, i, removed = 0
        cdef _AffSlot* s
        self._slots = NULL
        try:
            self._alloc(cap)
        except MemoryError:
            self._slots = old
            raise
        for i in range(oldcap):
            s = &old[i]
            if not s.used:
                continue
            if (expire and now - s.last_used >= self._timeout) or s.backend == drop:
                removed += 1
                continue
            self._insert(s.key, s.klen, s.backend, s.last_used)
        free(old)
        return removed

    def get(self, client_ip, double now):
        cdef uint8_t key[16]
        cdef int klen = _pack_ip(client_ip, key)
        cdef _AffSlot* s = &self._slots[self._find(key, klen)]
        if not s.used or now - s.last_used >= self._timeout:
            return None
        s.last_used = now
        return self._names[s.backend]

    def set(self, client_ip, str backend, double now):
        cdef uint8_t key[16]
        cdef int klen = _pack_ip(client_ip, key)
        cdef object bid = self._ids.get(backend)
        if bid is None:
            bid = len(self._names)
            self._names.append(backend)
            self._ids[backend] = bid
        self._insert(key, klen, <int32_t>bid, now)

    def sweep(self, double now):
        """Drop expired records; returns how many."""
        return self._rebuild(self._cap, 1, now, -1)

    def remove_backend(self, str backend):
        """Drop every record pointing at ``backend``; returns how many."""
        bid = self._ids.get(backend)
        if bid is None:
            return 0
        return self._rebuild(self._cap, 0, 0.0, <int32_t>bid)

    def clear(self):
        self._names = []
        self._ids = {}
        self._alloc(64)

    def records(self):
        """``(packed client IP, backend, last_used)`` for every record, sorted."""
        cdef Py_ssize_t i
        cdef _AffSlot* s
        cdef list out = []
        for i in range(self._cap):
            s = &self._slots[i]
            if s.used:
                out.append(
                    (PyBytes_FromStringAndSize(<char*>s.key, s.klen), self._names[s.backend], s.last_used)
                )
        out.sort()
        return out
