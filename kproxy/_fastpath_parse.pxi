# Included by _fastpath.pyx.  IPv4/IPv6 + TCP/UDP header parse for a
# packet-selection path.  The twin is kproxy/_fastpath_parse_py.py; its module
# docstring is the specification (statuses, record layout), the parity tests
# hold this C version to it byte for byte.

from libc.stdint cimport int32_t, uint16_t
from libc.string cimport memcmp
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.bytes cimport PyBytes_CheckExact

PARSE_OK = 0
PARSE_TRUNCATED = 1
PARSE_FRAGMENT = 2
PARSE_UNSUPPORTED = 3
PARSE_MALFORMED = 4
PARSED_SIZE = 40
MAX_EXTENSION_HEADERS = 8

cdef inline const uint8_t* _rbuf(object o, Py_buffer* view, Py_ssize_t* n, bint* held) except? NULL:
    # bytes is the common case (NFQUEUE payloads, recv()); skip the buffer protocol for it.
    if PyBytes_CheckExact(o):
        held[0] = False
        n[0] = PyBytes_GET_SIZE(o)
        return <const uint8_t*>PyBytes_AS_STRING(o)
    PyObject_GetBuffer(o, view, PyBUF_SIMPLE)
    held[0] = True
    n[0] = view.len
    return <const uint8_t*>view.buf


ctypedef struct _Parsed:
    uint8_t family
    uint8_t proto
    uint16_t sport
    uint16_t dport
    uint8_t alen
    uint8_t src[16]
    uint8_t dst[16]


cdef inline uint16_t _be16(const uint8_t* p) noexcept nogil:
    return ((<uint16_t>p[0]) << 8) | p[1]


cdef inline bint _is_ext(uint8_t nh) noexcept nogil:
    return nh == 0 or nh == 43 or nh == 60 or nh == 44


cdef int _parse_l4(const uint8_t* b, Py_ssize_t n, Py_ssize_t off, _Parsed* r) noexcept nogil:
    cdef Py_ssize_t need
    if r.proto == 6:
        need = 20
    elif r.proto == 17:
        need = 8
    else:
        return 3
    if n < off + need:
        return 1
    r.sport = _be16(b + off)
    r.dport = _be16(b + off + 2)
    return 0


cdef int _parse_c(const uint8_t* b, Py_ssize_t n, _Parsed* r) noexcept nogil:
    """Status of the parse of ``b[:n]`` into ``r`` (zeroed first); never fails otherwise."""
    cdef Py_ssize_t ihl, off
    cdef uint8_t version, nh
    cdef int i
    memset(r, 0, sizeof(_Parsed))
    if n < 1:
        return 1
    version = b[0] >> 4
    if version == 4:
        r.family = 4
        if n < 20:
            return 1
        ihl = (b[0] & 0x0F) * 4
        if ihl < 20:
            return 4
        if n < ihl:
            return 1
        r.proto = b[9]
        r.alen = 4
        memcpy(r.src, b + 12, 4)
        memcpy(r.dst, b + 16, 4)
        if _be16(b + 6) & 0x1FFF:
            return 2
        return _parse_l4(b, n, ihl, r)
    if version == 6:
        r.family = 6
        if n < 40:
            return 1
        r.alen = 16
        memcpy(r.src, b + 8, 16)
        memcpy(r.dst, b + 24, 16)
        nh = b[6]
        off = 40
        for i in range(8):
            if nh == 0 or nh == 43 or nh == 60:
                if n < off + 2:
                    r.proto = nh
                    return 1
                nh, off = b[off], off + (b[off + 1] + 1) * 8
            elif nh == 44:
                if n < off + 8:
                    r.proto = nh
                    return 1
                r.proto = b[off]
                if _be16(b + off + 2) >> 3:
                    return 2
                nh = b[off]
                off += 8
            else:
                break
        r.proto = nh
        if _is_ext(nh):
            return 3
        return _parse_l4(b, n, off, r)
    return 4


cdef inline void _write_record(const _Parsed* r, uint8_t* out) noexcept nogil:
    memset(out, 0, 40)
    out[0] = r.family
    out[1] = r.proto
    out[2] = r.sport >> 8
    out[3] = r.sport & 0xFF
    out[4] = r.dport >> 8
    out[5] = r.dport & 0xFF
    out[6] = r.alen
    memcpy(out + 8, r.src, r.alen)
    memcpy(out + 24, r.dst, r.alen)


cpdef int parse_into(object buf, object out) except -1:
    """Parse ``buf`` into the ``PARSED_SIZE``-byte record ``out``; returns the status.

    Raises ValueError only when ``out`` is too small (a caller bug, not a packet's).
    """
    cdef _Parsed rec
    cdef int status
    cdef Py_buffer view, oview
    cdef Py_ssize_t n = 0
    cdef bint held = False
    cdef const uint8_t* p = _rbuf(buf, &view, &n, &held)
    try:
        PyObject_GetBuffer(out, &oview, PyBUF_WRITABLE)
        try:
            if oview.len < 40:
                raise ValueError(f"out must hold 40 bytes, got {oview.len}")
            status = _parse_c(p, n, &rec)
            _write_record(&rec, <uint8_t*>oview.buf)
        finally:
            PyBuffer_Release(&oview)
    finally:
        if held:
            PyBuffer_Release(&view)
    return status


def parse_packet(object buf):
    """``(status, family, proto, src, sport, dst, dport)``; addresses as packed bytes."""
    cdef _Parsed r
    cdef Py_buffer view
    cdef Py_ssize_t n = 0
    cdef bint held = False
    cdef const uint8_t* p = _rbuf(buf, &view, &n, &held)
    cdef int status = _parse_c(p, n, &r)
    if held:
        PyBuffer_Release(&view)
    return (
        status, r.family, r.proto,
        PyBytes_FromStringAndSize(<char*>r.src, r.alen), r.sport,
        PyBytes_FromStringAndSize(<char*>r.dst, r.alen), r.dport,
    )
