# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled fast path; the pure-Python twin is ``kproxy/_fastpath_py.py``.

Same API and same results as the twin (the test suite checks them against
each other).  The chain-name hash runs a C SHA-256 with the GIL released and
builds the 16 base32 characters without any intermediate Python objects,
because rendering a large ruleset computes one hash per endpoint.  The rule
builders loop over typed tuples and build each line with one joined f-string
(no per-line temporaries beyond the line itself), for the same reason: a
10,000-Service ruleset has ~300,000 per-endpoint lines.
"""

from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

__all__ = [
    "RoundRobin",
    "endpoint_chain_names",
    "endpoint_chain_rules",
    "endpoint_hash",
    "port_proto_hash",
    "probability",
    "service_to_endpoint_rules",
]

cdef uint32_t _K[64]
_K_VALUES = (
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
)
for _i in range(64):
    _K[_i] = _K_VALUES[_i]

cdef const char* _B32 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


cdef inline uint32_t _rotr(uint32_t x, int n) noexcept nogil:
    return (x >> n) | (x << (32 - n))


cdef void _sha256_block(uint32_t* h, const uint8_t* p) noexcept nogil:
    cdef uint32_t w[64]
    cdef uint32_t a, b, c, d, e, f, g, hh, s0, s1, t1, t2
    cdef int i
    for i in range(16):
        w[i] = ((<uint32_t>p[4 * i]) << 24) | ((<uint32_t>p[4 * i + 1]) << 16) | \
               ((<uint32_t>p[4 * i + 2]) << 8) | (<uint32_t>p[4 * i + 3])
    for i in range(16, 64):
        s0 = _rotr(w[i - 15], 7) ^ _rotr(w[i - 15], 18) ^ (w[i - 15] >> 3)
        s1 = _rotr(w[i - 2], 17) ^ _rotr(w[i - 2], 19) ^ (w[i - 2] >> 10)
        w[i] = w[i - 16] + s0 + w[i - 7] + s1
    a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; hh = h[7]
    for i in range(64):
        s1 = _rotr(e, 6) ^ _rotr(e, 11) ^ _rotr(e, 25)
        t1 = hh + s1 + ((e & f) ^ ((~e) & g)) + _K[i] + w[i]
        s0 = _rotr(a, 2) ^ _rotr(a, 13) ^ _rotr(a, 22)
        t2 = s0 + ((a & b) ^ (a & c) ^ (b & c))
        hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh


cdef void _sha256(const uint8_t* data, size_t n, uint8_t* out) noexcept nogil:
    cdef uint32_t h[8]
    cdef uint8_t tail[128]
    cdef size_t off = 0, rem, tail_len, i
    cdef uint64_t bits = (<uint64_t>n) * 8
    h[0] = 0x6a09e667; h[1] = 0xbb67ae85; h[2] = 0x3c6ef372; h[3] = 0xa54ff53a
    h[4] = 0x510e527f; h[5] = 0x9b05688c; h[6] = 0x1f83d9ab; h[7] = 0x5be0cd19
    while n - off >= 64:
        _sha256_block(h, data + off)
        off += 64
    rem = n - off
    memset(tail, 0, 128)
    memcpy(tail, data + off, rem)
    tail[rem] = 0x80
    tail_len = 64 if rem < 56 else 128
    for i in range(8):
        tail[tail_len - 1 - i] = <uint8_t>(bits >> (8 * i))
    _sha256_block(h, tail)
    if tail_len == 128:
        _sha256_block(h, tail + 64)
    for i in range(8):
        out[4 * i] = <uint8_t>(h[i] >> 24)
        out[4 * i + 1] = <uint8_t>(h[i] >> 16)
        out[4 * i + 2] = <uint8_t>(h[i] >> 8)
        out[4 * i + 3] = <uint8_t>h[i]


cdef inline void _b32_5(const uint8_t* s, char* o) noexcept nogil:
    # five bytes -> eight base32 characters (RFC 4648, no padding needed)
    cdef uint64_t v = ((<uint64_t>s[0]) << 32) | ((<uint64_t>s[1]) << 24) | \
        ((<uint64_t>s[2]) << 16) | ((<uint64_t>s[3]) << 8) | (<uint64_t>s[4])
    cdef int i
    for i in range(8):
        o[i] = _B32[(v >> (35 - 5 * i)) & 31]


cdef str _hash16(bytes data):
    cdef uint8_t digest[32]
    cdef char out[16]
    cdef const uint8_t* p = <const uint8_t*><char*>data
    cdef size_t n = len(data)
    with nogil:
        _sha256(p, n, digest)
        _b32_5(digest, out)
        _b32_5(digest + 5, out + 8)
    return PyUnicode_DecodeASCII(out, 16, NULL)


cpdef str port_proto_hash(str service_port_name, str protocol):
    """Hash shared by a service port's KUBE-SVC/SVL/EXT/FW chains."""
    return _hash16((service_port_name + protocol).encode("utf-8"))


cpdef str endpoint_hash(str service_port_name, str protocol, str endpoint):
    """Hash of a KUBE-SEP chain; ``endpoint`` is ``"IP:port"`` (``"[v6]:port"``)."""
    return _hash16((service_port_name + protocol + endpoint).encode("utf-8"))


cpdef list endpoint_chain_names(str service_port_name, str protocol, endpoints):
    """``"KUBE-SEP-" + endpoint_hash(...)`` for each of ``endpoints``, in order."""
    cdef bytes prefix = (service_port_name + protocol).encode("utf-8")
    cdef list out = []
    cdef str ep
    for ep in endpoints:
        out.append("KUBE-SEP-" + _hash16(prefix + ep.encode("utf-8")))
    return out


cdef class RoundRobin:
    """Round-robin over an endpoint list (see the twin for the invariants)."""

    cdef tuple _endpoints
    cdef Py_ssize_t _index

    def __init__(self, endpoints=()):
        self._endpoints = tuple(endpoints)
        self._index = 0

    @property
    def endpoints(self):
        return self._endpoints

    @property
    def index(self):
        return self._index

    def __len__(self):
        return len(self._endpoints)

    cpdef bint set_endpoints(self, endpoints):
        cdef tuple new = tuple(endpoints)
        if new == self._endpoints:
            return False
        self._endpoints = new
        self._index = 0
        return True

    cpdef Py_ssize_t next_index(self) except -1:
        cdef Py_ssize_t n = len(self._endpoints)
        cdef Py_ssize_t i
        if n == 0:
            raise LookupError("no endpoints")
        i = self._index
        self._index = i + 1 if i + 1 < n else 0
        return i

    cpdef str next(self):
        return <str>self._endpoints[self.next_index()]


cdef str _MARK_MASQ = "KUBE-MARK-MASQ"
# Upstream precomputes these strings too; index n holds 1/n.
cdef list _PROBABILITIES = ["<bad value>"]


cpdef str probability(Py_ssize_t n):
    """Go's ``fmt.Sprintf("%0.10f", 1.0/float64(n))`` for ``n >= 1``, cached."""
    cdef list values = _PROBABILITIES
    if n < 1:
        raise ValueError(f"probability needs n >= 1, got {n}")
    while len(values) <= n:
        values.append("%0.10f" % (1.0 / len(values)))
    return <str>values[n]


cpdef list service_to_endpoint_rules(
    str chain, str name, endpoints, seps, bint affinity, long seconds, bint comments
):
    """The rules of a KUBE-SVC/KUBE-SVL ``chain`` that pick one of ``endpoints``."""
    cdef tuple eps = tuple(endpoints)
    cdef tuple chains = tuple(seps)
    cdef Py_ssize_t n = len(eps)
    cdef Py_ssize_t i
    cdef str sep, comment = ""
    cdef list out = []
    if len(chains) != n:
        raise ValueError(f"{n} endpoints but {len(chains)} chains")
    # The first n-1 probabilities, fetched before the loop so that it only builds lines.
    if n > 1:
        probability(n)
    if affinity:
        for i in range(n):
            sep = <str>chains[i]
            if comments:
                comment = f' -m comment --comment "{name} -> {<str>eps[i]}"'
            out.append(
                f"-A {chain}{comment} -m recent --name {sep}"
                f" --rcheck --seconds {seconds} --reap -j {sep}"
            )
    for i in range(n):
        sep = <str>chains[i]
        if comments:
            comment = f' -m comment --comment "{name} -> {<str>eps[i]}"'
        if i < n - 1:
            out.append(
                f"-A {chain}{comment} -m statistic --mode random"
                f" --probability {<str>_PROBABILITIES[n - i]} -j {sep}"
            )
        else:
            out.append(f"-A {chain}{comment} -j {sep}")
    return out


cpdef tuple endpoint_chain_rules(
    str name, str match, endpoints, seps, ips, bint affinity, bint comments
):
    """The chain lines and rules of the KUBE-SEP chains ``seps`` (see the twin)."""
    cdef tuple eps = tuple(endpoints)
    cdef tuple chains_in = tuple(seps)
    cdef tuple addrs = tuple(ips)
    cdef Py_ssize_t n = len(chains_in)
    cdef Py_ssize_t i
    cdef str sep
    cdef str comment = f" -m comment --comment {name}" if comments else ""
    cdef str recent = ""
    cdef list chains = []
    cdef list rules = []
    if len(eps) != n or len(addrs) != n:
        raise ValueError(f"{n} chains but {len(eps)} endpoints and {len(addrs)} IPs")
    for i in range(n):
        sep = <str>chains_in[i]
        chains.append(f":{sep} - [0:0]")
        rules.append(f"-A {sep}{comment} -s {<str>addrs[i]} -j {_MARK_MASQ}")
        if affinity:
            recent = f" -m recent --name {sep} --set"
        rules.append(
            f"-A {sep}{comment}{recent} {match} -j DNAT --to-destination {<str>eps[i]}"
        )
    return chains, rules


# Userspace-mode fast path, split by what it owns (each twin is a module of its
# own, re-exported by _fastpath_py).
include "_fastpath_parse.pxi"
include "_fastpath_select.pxi"

__all__ += [
    "FLOW_SEED",
    "MAGLEV_OFFSET_SEED",
    "MAGLEV_SKIP_SEED",
    "MAX_EXTENSION_HEADERS",
    "PARSED_SIZE",
    "PARSE_FRAGMENT",
    "PARSE_MALFORMED",
    "PARSE_OK",
    "PARSE_TRUNCATED",
    "PARSE_UNSUPPORTED",
    "ClientIPAffinity",
    "Maglev",
    "client_key",
    "flow_hash",
    "hash64",
    "parse_into",
    "parse_packet",
]

# The relay loop: RelayLoop (thread, control pipe, API), its byte relay and its
# accept/dial; twins _fastpath_relay_py, _fastpath_splice_py, _fastpath_accept_py.
include "_fastpath_relay.pxi"
include "_fastpath_splice.pxi"
include "_fastpath_accept.pxi"

__all__ += ["RELAY_COPY_BUFFER", "RelayLoop"]

include "_fastpath_nfq.pxi"

__all__ += ["NFQ_BATCH", "NfqLoop"]
