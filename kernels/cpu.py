"""CPU kernels: a ``prange`` loop (and a serial twin for small arrays) around a rule, for one
array or for a table of many. The loops themselves are generated in
:mod:`fastrms.kernels.elementwise`; this module chooses between them."""

from .elementwise import TEAM_ARGS, grouped_loops, loops, team_body  # noqa: F401

#: Below this many elements (in all, for a grouped step) a step runs on one thread: waking the
#: thread team costs more than it saves. Measured on the 2-core CI machine with the TBB layer
#: fastrms uses (fastrms.threads): an Adam step over 10^5 elements took 89 us on one thread and
#: 158 us on two when it followed torch's own multithreaded step, 66 us and 69 us alone; at
#: 2*10^5 two threads win (97 us against 116 us). Under GNU OpenMP the crossover was 2^16.
PARALLEL_THRESHOLD = 1 << 17


def launch(rule, flags, arrays, hyper):
    """Run one step of ``rule`` over the 1-D arrays ``arrays`` (parameter first)."""
    n = arrays[0].size
    parallel, serial = loops(rule, flags)
    (parallel if n >= PARALLEL_THRESHOLD else serial)(n, arrays, hyper)
