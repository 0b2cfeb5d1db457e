# Included by _fastpath.pyx.  The NFQUEUE loop: recv -> parse -> select ->
# verdict in C with the GIL released.  The twin is kproxy/_fastpath_nfq_py.py
# (python-netfilterqueue + the same decision in Python); its docstrings are the
# specification, the parity tests hold this build to it.
#
# Why not nfq_handle_packet + nfq_set_verdict2: those cost two syscalls per
# packet (one recv, one sendmsg per verdict).  Here libnetfilter_queue only
# binds and configures the queues; the loop reads up to NFQ_BATCH queued
# packets with one recvmmsg(2), parses the nfnetlink_queue messages itself
# (kernel ABI: nlmsghdr, nfgenmsg, NFQA_* attributes) and sends all their
# verdicts as consecutive netlink messages in ONE send(2) (netlink_rcv_skb
# handles every message of a datagram).  Identifiers are prefixed _nfq /
# _NFQ and declared with C names so that they never collide with the other
# .pxi files of this module.

from libc.stdint cimport int32_t as _nfq_i32

cdef extern from "<libnetfilter_queue/libnetfilter_queue.h>" nogil:
    struct nfq_handle:
        pass
    struct nfq_q_handle:
        pass
    struct nfq_data:
        pass
    struct nfgenmsg:
        pass
    ctypedef int (*_nfq_callback_t "nfq_callback")(nfq_q_handle*, nfgenmsg*, nfq_data*, void*)
    nfq_handle* _nfq_open "nfq_open"()
    int _nfq_close "nfq_close"(nfq_handle* h)
    int _nfq_bind_pf "nfq_bind_pf"(nfq_handle* h, uint16_t pf)
    nfq_q_handle* _nfq_create_queue "nfq_create_queue"(
        nfq_handle* h, uint16_t num, _nfq_callback_t cb, void* data)
    int _nfq_destroy_queue "nfq_destroy_queue"(nfq_q_handle* qh)
    int _nfq_set_mode "nfq_set_mode"(nfq_q_handle* qh, uint8_t mode, uint32_t range)
    int _nfq_set_queue_maxlen "nfq_set_queue_maxlen"(nfq_q_handle* qh, uint32_t len)
    int _nfq_set_queue_flags "nfq_set_queue_flags"(nfq_q_handle* qh, uint32_t mask, uint32_t flags)
    int _nfq_fd "nfq_fd"(nfq_handle* h)

cdef extern from "<sys/socket.h>" nogil:
    struct _nfq_iovec "iovec":
        void* iov_base
        size_t iov_len
    struct _nfq_msghdr "msghdr":
        void* msg_name
        unsigned int msg_namelen
        _nfq_iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    struct _nfq_mmsghdr "mmsghdr":
        _nfq_msghdr msg_hdr
        unsigned int msg_len
    int _nfq_recvmmsg "recvmmsg"(int fd, _nfq_mmsghdr* v, unsigned int n, int flags, void* timeout)
    ssize_t _nfq_send "send"(int fd, const void* buf, size_t n, int flags)
    int _nfq_setsockopt "setsockopt"(int fd, int level, int name, const void* val, unsigned int len)
    const int _NFQ_MSG_DONTWAIT "MSG_DONTWAIT"
    const int _NFQ_SOL_SOCKET "SOL_SOCKET"
    const int _NFQ_SO_RCVBUFFORCE "SO_RCVBUFFORCE"
    const int _NFQ_SO_RCVBUF "SO_RCVBUF"

cdef extern from "<poll.h>" nogil:
    struct _nfq_pollfd "pollfd":
        int fd
        short events
        short revents
    int _nfq_poll "poll"(_nfq_pollfd* fds, unsigned long n, int timeout)
    const short _NFQ_POLLIN "POLLIN"

cdef extern from "<unistd.h>" nogil:
    int _nfq_pipe2 "pipe2"(int* fds, int flags)
    int _nfq_close_fd "close"(int fd)
    ssize_t _nfq_read "read"(int fd, void* buf, size_t n)
    ssize_t _nfq_write "write"(int fd, const void* buf, size_t n)

cdef extern from "<fcntl.h>" nogil:
    const int _NFQ_O_NONBLOCK "O_NONBLOCK"
    const int _NFQ_O_CLOEXEC "O_CLOEXEC"

cdef extern from "<errno.h>" nogil:
    int _nfq_errno "errno"
    const int _NFQ_EAGAIN "EAGAIN"
    const int _NFQ_EINTR "EINTR"
    const int _NFQ_ENOBUFS "ENOBUFS"

cdef extern from "<time.h>" nogil:
    struct _nfq_timespec "timespec":
        long tv_sec
        long tv_nsec
    int _nfq_clock_gettime "clock_gettime"(int clk, _nfq_timespec* ts)
    const int _NFQ_CLOCK_MONOTONIC "CLOCK_MONOTONIC"

cdef extern from "<pthread.h>" nogil:
    ctypedef struct _nfq_mutex_t "pthread_mutex_t":
        pass
    int _nfq_mutex_init "pthread_mutex_init"(_nfq_mutex_t* m, void* attr)
    int _nfq_mutex_destroy "pthread_mutex_destroy"(_nfq_mutex_t* m)
    int _nfq_mutex_lock "pthread_mutex_lock"(_nfq_mutex_t* m)
    int _nfq_mutex_unlock "pthread_mutex_unlock"(_nfq_mutex_t* m)

# Kernel ABI (linux/netfilter.h, linux/netlink.h, linux/netfilter/nfnetlink*.h).
NFQ_BATCH = 64
cdef int _NFQ_BATCH = 64
cdef uint32_t _NF_ACCEPT = 1
cdef uint16_t _NFQ_MSG_PACKET = (3 << 8) | 0
cdef uint16_t _NFQ_MSG_VERDICT = (3 << 8) | 1
cdef uint16_t _NFQA_PACKET_HDR = 1
cdef uint16_t _NFQA_VERDICT_HDR = 2
cdef uint16_t _NFQA_MARK = 3
cdef uint16_t _NFQA_PAYLOAD = 10
cdef uint8_t _NFQNL_COPY_PACKET = 2
cdef uint32_t _NFQA_CFG_F_FAIL_OPEN = 1
cdef uint32_t _NFQA_CFG_F_GSO = 4
cdef int _NFQ_SOL_NETLINK = 270
cdef int _NFQ_NETLINK_NO_ENOBUFS = 5
cdef int _NFQ_VERDICT_LEN = 32
cdef int _NFQ_VERDICT_MARK_LEN = 40
# Unmarked reasons: 1..4 parse status, 5 no service, 6 error (as the Decider's).
cdef int _NFQ_NO_SERVICE = 5
cdef int _NFQ_ERROR = 6


cdef int _nfq_noop_cb(nfq_q_handle* qh, nfgenmsg* m, nfq_data* d, void* data) noexcept nogil:
    # Never called: the loop parses the messages itself (see the header comment).
    return 0


ctypedef struct _NfqSvc:
    _nfq_i32* table         # Maglev slots, borrowed from a Maglev kept alive by the generation
    uint32_t m
    Py_ssize_t* rr_index    # RoundRobin._index, same ownership
    Py_ssize_t n            # endpoints
    uint32_t* marks         # mark field value per endpoint index
    int delegate            # ClientIP affinity: decided by the Python delegate
    uint64_t marked


ctypedef struct _NfqKey:
    uint8_t used
    uint8_t alen
    uint8_t proto
    uint16_t port
    uint8_t addr[16]
    _nfq_i32 svc


ctypedef struct _NfqGen:
    _NfqSvc* svcs
    Py_ssize_t nsvc
    _NfqKey* keys
    Py_ssize_t cap          # power of two, at least twice the number of keys


cdef void _nfq_gen_free(_NfqGen* g) noexcept nogil:
    cdef Py_ssize_t i
    if g == NULL:
        return
    if g.svcs != NULL:
        for i in range(g.nsvc):
            free(g.svcs[i].marks)
    free(g.svcs)
    free(g.keys)
    free(g)


cdef inline uint64_t _nfq_key_hash(const uint8_t* addr, int alen, uint16_t port, uint8_t proto) noexcept nogil:
    cdef uint8_t k[19]
    memcpy(k, addr, alen)
    k[alen] = proto
    k[alen + 1] = port >> 8
    k[alen + 2] = port & 0xFF
    return _hash64(k, alen + 3, _AFFINITY_SEED)


cdef inline Py_ssize_t _nfq_find(
    const _NfqGen* g, const uint8_t* addr, int alen, uint16_t port, uint8_t proto
) noexcept nogil:
    # Linear probing; returns the slot holding the key or the empty slot ending the probe.
    cdef Py_ssize_t mask = g.cap - 1
    cdef Py_ssize_t i = <Py_ssize_t>(_nfq_key_hash(addr, alen, port, proto) & <uint64_t>mask)
    cdef const _NfqKey* k
    while True:
        k = &g.keys[i]
        if not k.used:
            return i
        if k.alen == alen and k.port == port and k.proto == proto and memcmp(k.addr, addr, alen) == 0:
            return i
        i = (i + 1) & mask


cdef inline uint32_t _nfq_decide(
    _NfqGen* g, const uint8_t* p, Py_ssize_t n, uint64_t* unmarked, int* delegate
) noexcept nogil:
    # The mark field value for one packet (0: unmarked); sets delegate[0] for affinity services.
    cdef _Parsed rec
    cdef int status = _parse_c(p, n, &rec)
    cdef _NfqKey* k
    cdef _NfqSvc* s
    cdef Py_ssize_t i
    delegate[0] = 0
    if status != 0:
        unmarked[status] += 1
        return 0
    if g == NULL or g.cap == 0:
        unmarked[_NFQ_NO_SERVICE] += 1
        return 0
    k = &g.keys[_nfq_find(g, rec.dst, rec.alen, rec.dport, rec.proto)]
    if not k.used:
        unmarked[_NFQ_NO_SERVICE] += 1
        return 0
    s = &g.svcs[k.svc]
    if s.delegate:
        delegate[0] = 1
        return 0
    if s.table != NULL:
        i = s.table[_flow_hash_c(rec.proto, rec.src, rec.dst, rec.alen, rec.sport, rec.dport) % s.m]
    elif s.rr_index != NULL and s.n > 0:
        i = s.rr_index[0]
        if i >= s.n or i < 0:
            i = 0
        s.rr_index[0] = i + 1 if i + 1 < s.n else 0
    else:
        unmarked[_NFQ_ERROR] += 1
        return 0
    if i < 0 or i >= s.n:
        unmarked[_NFQ_ERROR] += 1
        return 0
    s.marked += 1
    return s.marks[i]


cdef inline uint32_t _nfq_be32(const uint8_t* p) noexcept nogil:
    return ((<uint32_t>p[0]) << 24) | ((<uint32_t>p[1]) << 16) | ((<uint32_t>p[2]) << 8) | p[3]


cdef inline void _nfq_put_be32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


cdef inline int _nfq_put_verdict(
    uint8_t* out, const uint8_t* res_id, uint32_t pkt_id, bint set_mark, uint32_t mark
) noexcept nogil:
    # nlmsghdr | nfgenmsg | NFQA_VERDICT_HDR {verdict, id} [| NFQA_MARK]; returns the length.
    cdef uint32_t ln = _NFQ_VERDICT_MARK_LEN if set_mark else _NFQ_VERDICT_LEN
    cdef uint16_t u16
    memcpy(out, &ln, 4)
    u16 = _NFQ_MSG_VERDICT
    memcpy(out + 4, &u16, 2)
    u16 = 1  # NLM_F_REQUEST, no ACK: success sends nothing back
    memcpy(out + 6, &u16, 2)
    memset(out + 8, 0, 8)  # seq, portid
    out[16] = 0  # AF_UNSPEC
    out[17] = 0  # NFNETLINK_V0
    out[18] = res_id[0]
    out[19] = res_id[1]
    u16 = 12
    memcpy(out + 20, &u16, 2)
    u16 = _NFQA_VERDICT_HDR
    memcpy(out + 22, &u16, 2)
    _nfq_put_be32(out + 24, _NF_ACCEPT)
    _nfq_put_be32(out + 28, pkt_id)
    if set_mark:
        u16 = 8
        memcpy(out + 32, &u16, 2)
        u16 = _NFQA_MARK
        memcpy(out + 34, &u16, 2)
        _nfq_put_be32(out + 36, mark)
    return <int>ln


cdef inline double _nfq_now() noexcept nogil:
    cdef _nfq_timespec ts
    _nfq_clock_gettime(_NFQ_CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class NfqLoop:
    """NFQUEUE queues served by a C loop (see the twin for the contract)."""

    cdef nfq_handle* _h
    cdef list _qhs_py           # queue numbers bound
    cdef nfq_q_handle** _qhs
    cdef Py_ssize_t _nq
    cdef int _fd
    cdef int _wake[2]
    cdef tuple _queues
    cdef uint32_t _copy_range
    cdef uint32_t _max_len
    cdef uint32_t _keep
    cdef bint _fail_open_req
    cdef bint _gso_req
    cdef public bint fail_open
    cdef public bint gso
    cdef object _delegate
    cdef _nfq_mutex_t _lock
    cdef _NfqGen* _gen
    cdef list _gen_refs         # Maglev/RoundRobin objects the generation borrows from
    cdef list _gen_keys         # per-service key objects (for take_marked)
    cdef uint64_t _unmarked[7]
    cdef uint64_t _packets
    cdef uint64_t _errors
    cdef uint64_t _delegated
    cdef uint64_t _send_errors
    cdef uint8_t* _rbuf_mem
    cdef Py_ssize_t _slot
    cdef _nfq_mmsghdr* _msgs
    cdef _nfq_iovec* _iov
    cdef uint8_t* _sbuf
    cdef bint _running

    def __cinit__(self):
        self._h = NULL
        self._qhs = NULL
        self._nq = 0
        self._fd = -1
        self._wake[0] = -1
        self._wake[1] = -1
        self._gen = NULL
        self._rbuf_mem = NULL
        self._msgs = NULL
        self._iov = NULL
        self._sbuf = NULL
        _nfq_mutex_init(&self._lock, NULL)

    def __dealloc__(self):
        self._close_c()
        _nfq_gen_free(self._gen)
        self._gen = NULL
        free(self._rbuf_mem)
        free(self._msgs)
        free(self._iov)
        free(self._sbuf)
        _nfq_mutex_destroy(&self._lock)

    def __init__(
        self, queues, *, copy_range=128, max_len=4096, mark_mask=0xFFFFFFFF,
        fail_open=True, gso=True, delegate=None,
    ):
        cdef Py_ssize_t i
        self._queues = tuple(int(q) for q in queues)
        for q in self._queues:
            if not 0 <= q <= 0xFFFF:
                raise ValueError(f"queue numbers are 16-bit, got {q}")
        if not 0 < copy_range <= 0xFFFF:
            raise ValueError(f"copy_range must be in 1..65535, got {copy_range}")
        self._copy_range = copy_range
        self._max_len = max_len
        self._keep = 0xFFFFFFFF & ~(<uint32_t>mark_mask)
        self._fail_open_req = fail_open
        self._gso_req = gso
        self.fail_open = False
        self.gso = False
        self._delegate = delegate
        self._gen_refs = []
        self._gen_keys = []
        self._qhs_py = []
        for i in range(7):
            self._unmarked[i] = 0
        self._packets = self._errors = self._delegated = self._send_errors = 0
        # A netlink message per packet: headers, the attributes before the payload
        # (a few hundred bytes at most) and the copied payload.
        self._slot = ((copy_range + 1024 + 63) // 64) * 64
        if self._rbuf_mem == NULL:
            self._rbuf_mem = <uint8_t*>malloc(self._slot * _NFQ_BATCH)
            self._msgs = <_nfq_mmsghdr*>calloc(_NFQ_BATCH, sizeof(_nfq_mmsghdr))
            self._iov = <_nfq_iovec*>calloc(_NFQ_BATCH, sizeof(_nfq_iovec))
            self._sbuf = <uint8_t*>malloc(_NFQ_VERDICT_MARK_LEN * _NFQ_BATCH)
            if self._rbuf_mem == NULL or self._msgs == NULL or self._iov == NULL or self._sbuf == NULL:
                raise MemoryError()

    @property
    def queues(self):
        return self._queues

    def fileno(self):
        return self._fd

    @property
    def bound(self):
        return self._h != NULL

    # -- binding -------------------------------------------------------------------
    def open(self):
        """Bind every queue in the caller's network namespace; raises OSError."""
        cdef int one = 1, rcv = 8 << 20
        cdef Py_ssize_t i
        cdef uint16_t q
        cdef uint32_t flags = 0
        if self._h != NULL:
            return
        self._h = _nfq_open()
        if self._h == NULL:
            raise OSError(_nfq_errno, "nfq_open failed (is the process root in this netns?)")
        try:
            _nfq_bind_pf(self._h, 2)   # AF_INET: a no-op on kernels >= 3.8, needed before
            _nfq_bind_pf(self._h, 10)  # AF_INET6
            self._qhs = <nfq_q_handle**>calloc(len(self._queues) or 1, sizeof(void*))
            if self._qhs == NULL:
                raise MemoryError()
            for i in range(len(self._queues)):
                q = self._queues[i]
                self._qhs[i] = _nfq_create_queue(self._h, q, _nfq_noop_cb, NULL)
                if self._qhs[i] == NULL:
                    raise OSError(_nfq_errno, f"cannot bind NFQUEUE {q}")
                self._nq = i + 1
                if _nfq_set_mode(self._qhs[i], _NFQNL_COPY_PACKET, self._copy_range) < 0:
                    raise OSError(_nfq_errno, f"NFQUEUE {q}: cannot set the copy mode")
                _nfq_set_queue_maxlen(self._qhs[i], self._max_len)
                flags = 0
                if self._fail_open_req:
                    flags |= _NFQA_CFG_F_FAIL_OPEN
                if self._gso_req:
                    flags |= _NFQA_CFG_F_GSO
                # Flags are best effort: an old kernel refuses them, the queue still works.
                if flags and _nfq_set_queue_flags(self._qhs[i], flags, flags) == 0:
                    self.fail_open = self._fail_open_req
                    self.gso = self._gso_req
            self._fd = _nfq_fd(self._h)
            # Drops would otherwise surface as ENOBUFS on recv; /proc counts them anyway.
            _nfq_setsockopt(self._fd, _NFQ_SOL_NETLINK, _NFQ_NETLINK_NO_ENOBUFS, &one, sizeof(int))
            if _nfq_setsockopt(self._fd, _NFQ_SOL_SOCKET, _NFQ_SO_RCVBUFFORCE, &rcv, sizeof(int)) < 0:
                _nfq_setsockopt(self._fd, _NFQ_SOL_SOCKET, _NFQ_SO_RCVBUF, &rcv, sizeof(int))
            if self._wake[0] < 0 and _nfq_pipe2(self._wake, _NFQ_O_NONBLOCK | _NFQ_O_CLOEXEC) < 0:
                raise OSError(_nfq_errno, "pipe2 failed")
        except BaseException:
            self._close_c()
            raise

    cdef void _close_c(self) noexcept:
        cdef Py_ssize_t i
        if self._h != NULL:
            for i in range(self._nq):
                if self._qhs[i] != NULL:
                    _nfq_destroy_queue(self._qhs[i])
            _nfq_close(self._h)
            self._h = NULL
        free(self._qhs)
        self._qhs = NULL
        self._nq = 0
        self._fd = -1
        for i in range(2):
            if self._wake[i] >= 0:
                _nfq_close_fd(self._wake[i])
                self._wake[i] = -1

    def close(self):
        """Unbind the queues (idempotent); RuntimeError while :meth:`run` runs."""
        if self._running:
            # The loop reads the socket and buffers without the GIL: never pull them away.
            raise RuntimeError("NfqLoop.close() while run() is running; wake() it first")
        self._close_c()

    # -- tables (any thread) -------------------------------------------------------
    def set_services(self, services):
        """Publish ``(key, frontends, port, proto, maglev, rr, marks, delegate)`` entries."""
        cdef list entries = list(services)
        cdef list refs = []
        cdef list keys = []
        cdef Py_ssize_t nkeys = 0, cap = 1, i, j, slot
        cdef _NfqGen* g = <_NfqGen*>calloc(1, sizeof(_NfqGen))
        cdef _NfqGen* old
        cdef _NfqSvc* s
        cdef _NfqKey* k
        cdef Maglev mg
        cdef RoundRobin rr
        cdef bytes ip
        cdef tuple marks
        if g == NULL:
            raise MemoryError()
        try:
            for e in entries:
                nkeys += len(e[1])
            while cap < 2 * nkeys + 2:
                cap *= 2
            g.cap = cap
            g.keys = <_NfqKey*>calloc(cap, sizeof(_NfqKey))
            g.svcs = <_NfqSvc*>calloc(len(entries) or 1, sizeof(_NfqSvc))
            if g.keys == NULL or g.svcs == NULL:
                raise MemoryError()
            for i in range(len(entries)):
                key, frontends, port, proto, maglev, rrobj, marks_in, delegate = entries[i]
                marks = tuple(marks_in)
                s = &g.svcs[i]
                g.nsvc = i + 1
                s.n = len(marks)
                s.marks = <uint32_t*>calloc(s.n or 1, sizeof(uint32_t))
                if s.marks == NULL:
                    raise MemoryError()
                for j in range(s.n):
                    s.marks[j] = <uint32_t>marks[j]
                s.delegate = 1 if delegate else 0
                if maglev is not None:
                    mg = <Maglev?>maglev
                    s.table = mg._table
                    s.m = mg._m
                    refs.append(mg)
                elif rrobj is not None:
                    rr = <RoundRobin?>rrobj
                    s.rr_index = &rr._index
                    if len(rr._endpoints) != s.n:
                        raise ValueError("the round robin and the marks differ in length")
                    refs.append(rr)
                elif not delegate:
                    raise ValueError("a service needs a Maglev, a RoundRobin or the delegate")
                keys.append(key)
                if not (0 <= port <= 0xFFFF and 0 <= proto <= 0xFF):
                    raise ValueError("port must fit 16 bits and proto 8 bits")
                for ip in frontends:
                    if len(ip) != 4 and len(ip) != 16:
                        raise ValueError(f"frontends are packed addresses, got {ip!r}")
                    slot = _nfq_find(g, <const uint8_t*><char*>ip, len(ip), port, proto)
                    k = &g.keys[slot]
                    k.used = 1
                    k.alen = <uint8_t>len(ip)
                    k.port = <uint16_t>port
                    k.proto = <uint8_t>proto
                    memcpy(k.addr, <const char*>ip, len(ip))
                    k.svc = <_nfq_i32>i
        except BaseException:
            _nfq_gen_free(g)
            raise
        # The swap: the loop holds the lock for a batch, so once we own it no packet
        # uses the old generation; wait without the GIL (the loop may need it).
        with nogil:
            _nfq_mutex_lock(&self._lock)
        old = self._gen
        old_keys = self._gen_keys
        old_counts = []
        if old != NULL:
            for i in range(old.nsvc):
                old_counts.append(old.svcs[i].marked)
        self._gen = g
        self._gen_refs = refs  # the old objects are released only after the swap
        self._gen_keys = keys
        _nfq_mutex_unlock(&self._lock)
        _nfq_gen_free(old)
        return [(k2, n) for k2, n in zip(old_keys, old_counts) if n]

    def take_marked(self):
        """``[(key, n)]``: packets marked per service since the last call (then reset)."""
        cdef Py_ssize_t i
        cdef list out = []
        with nogil:
            _nfq_mutex_lock(&self._lock)
        try:
            if self._gen != NULL:
                for i in range(self._gen.nsvc):
                    if self._gen.svcs[i].marked:
                        out.append((self._gen_keys[i], self._gen.svcs[i].marked))
                        self._gen.svcs[i].marked = 0
        finally:
            _nfq_mutex_unlock(&self._lock)
        return out

    def stats(self):
        """``{"packets", "errors", "delegated", "send_errors", "unmarked": [7 ints]}``."""
        return {
            "packets": self._packets,
            "errors": self._errors,
            "delegated": self._delegated,
            "send_errors": self._send_errors,
            "unmarked": [self._unmarked[i] for i in range(7)],
        }

    # -- the decision ----------------------------------------------------------------
    cdef uint32_t _call_delegate(self, const uint8_t* p, Py_ssize_t n) noexcept with gil:
        cdef object r
        self._delegated += 1
        try:
            r = self._delegate(PyBytes_FromStringAndSize(<const char*>p, n))
            return <uint32_t>r
        except BaseException:
            self._errors += 1
            return 0

    def decide(self, object buf):
        """The mark field value the loop gives ``buf`` (IP header first); 0: unmarked."""
        cdef Py_buffer view
        cdef Py_ssize_t n = 0
        cdef bint held = False
        cdef const uint8_t* p = _rbuf(buf, &view, &n, &held)
        cdef uint32_t m = 0
        cdef int dlg = 0
        try:
            with nogil:
                _nfq_mutex_lock(&self._lock)
                m = _nfq_decide(self._gen, p, n, self._unmarked, &dlg)
                if dlg:
                    m = self._call_delegate(p, n)
                _nfq_mutex_unlock(&self._lock)
        finally:
            if held:
                PyBuffer_Release(&view)
        return m

    # -- the loop --------------------------------------------------------------------
    def wake(self):
        """Make a running :meth:`run` return soon (any thread)."""
        cdef char c = b"x"
        if self._wake[1] >= 0:
            _nfq_write(self._wake[1], &c, 1)

    def run(self, double seconds):
        """Serve the queues for up to ``seconds`` or until :meth:`wake`; returns packets handled."""
        cdef long rc
        cdef uint64_t before = self._packets
        if self._h == NULL:
            raise RuntimeError("NfqLoop.run() before open()")
        if self._running:
            raise RuntimeError("NfqLoop.run() is already running")
        self._running = True
        try:
            with nogil:
                rc = self._serve(seconds)
        finally:
            self._running = False
        if rc < 0:
            raise OSError(<int>-rc, "NFQUEUE recv failed")
        return self._packets - before

    cdef long _serve(self, double seconds) noexcept nogil:
        cdef double deadline = _nfq_now() + seconds
        cdef double left
        cdef _nfq_pollfd pfd[2]
        cdef char drain[64]
        cdef int r, i, rounds
        while True:
            left = deadline - _nfq_now()
            if left <= 0:
                return 0
            pfd[0].fd = self._fd
            pfd[0].events = _NFQ_POLLIN
            pfd[0].revents = 0
            pfd[1].fd = self._wake[0]
            pfd[1].events = _NFQ_POLLIN
            pfd[1].revents = 0
            r = _nfq_poll(pfd, 2, <int>(left * 1000) + 1)
            if r < 0:
                if _nfq_errno == _NFQ_EINTR:
                    continue
                return -_nfq_errno
            if pfd[1].revents:
                while _nfq_read(self._wake[0], drain, 64) > 0:
                    pass
                return 0
            if pfd[0].revents:
                # Drain what is queued, bounded so that the deadline and wake are seen.
                for rounds in range(1024):
                    r = self._batch()
                    if r < 0:
                        return r
                    if r < _NFQ_BATCH:
                        break

    cdef int _batch(self) noexcept nogil:
        # One recvmmsg, the decisions under the table lock, one send of all verdicts.
        cdef int n, i, dlg
        cdef Py_ssize_t off, end, a, alen, nl, plen, sl = 0
        cdef const uint8_t* b
        cdef const uint8_t* payload
        cdef uint8_t res_id[2]
        cdef uint16_t u16, atype
        cdef uint32_t nlen, pkt_id, mark, m
        cdef bint have_id
        for i in range(_NFQ_BATCH):
            self._iov[i].iov_base = self._rbuf_mem + i * self._slot
            self._iov[i].iov_len = self._slot
            memset(&self._msgs[i].msg_hdr, 0, sizeof(_nfq_msghdr))
            self._msgs[i].msg_hdr.msg_iov = &self._iov[i]
            self._msgs[i].msg_hdr.msg_iovlen = 1
        while True:
            n = _nfq_recvmmsg(self._fd, self._msgs, _NFQ_BATCH, _NFQ_MSG_DONTWAIT, NULL)
            if n >= 0:
                break
            if _nfq_errno == _NFQ_EINTR or _nfq_errno == _NFQ_ENOBUFS:
                continue
            if _nfq_errno == _NFQ_EAGAIN:
                return 0
            return -_nfq_errno
        _nfq_mutex_lock(&self._lock)
        for i in range(n):
            b = self._rbuf_mem + i * self._slot
            end = self._msgs[i].msg_len
            off = 0
            while off + 16 <= end:
                memcpy(&nlen, b + off, 4)
                memcpy(&u16, b + off + 4, 2)
                if nlen < 16 or off + nlen > end:
                    break
                if u16 == _NFQ_MSG_PACKET and nlen >= 20:
                    res_id[0] = b[off + 18]
                    res_id[1] = b[off + 19]
                    have_id = False
                    pkt_id = 0
                    mark = 0
                    payload = NULL
                    plen = 0
                    a = off + 20
                    while a + 4 <= off + nlen:
                        memcpy(&u16, b + a, 2)
                        alen = u16
                        memcpy(&atype, b + a + 2, 2)
                        atype &= 0x3FFF
                        if alen < 4 or a + alen > off + nlen:
                            break
                        if atype == _NFQA_PACKET_HDR and alen >= 8:
                            pkt_id = _nfq_be32(b + a + 4)
                            have_id = True
                        elif atype == _NFQA_MARK and alen >= 8:
                            mark = _nfq_be32(b + a + 4)
                        elif atype == _NFQA_PAYLOAD:
                            payload = b + a + 4
                            plen = alen - 4
                        a += (alen + 3) & ~3
                    if have_id:
                        self._packets += 1
                        m = _nfq_decide(self._gen, payload, plen, self._unmarked, &dlg)
                        if dlg:
                            m = self._call_delegate(payload, plen)
                        sl += _nfq_put_verdict(
                            self._sbuf + sl, res_id, pkt_id, m != 0, (mark & self._keep) | m
                        )
                        if sl + _NFQ_VERDICT_MARK_LEN > _NFQ_VERDICT_MARK_LEN * _NFQ_BATCH:
                            self._flush(sl)
                            sl = 0
                off += (nlen + 3) & ~3
        _nfq_mutex_unlock(&self._lock)
        if sl:
            self._flush(sl)
        return n

    cdef void _flush(self, Py_ssize_t sl) noexcept nogil:
        while _nfq_send(self._fd, self._sbuf, sl, 0) < 0:
            if _nfq_errno != _NFQ_EINTR:
                # The packets stay queued until unbind (fail-open does not help):
                # counted; the kernel's /proc counters show the backlog.
                self._send_errors += 1
                return
