"""The allocator policy: big blocks go to mmap, trim() returns freed heap pages."""
import ctypes
import platform

import pytest

from dpg_jax import host_memory

glibc = pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc',
                           reason='mallopt/malloc_trim are glibc calls')


def _rss_mib() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  raise AssertionError('no VmRSS')


@glibc
def test_configure_is_taken_by_glibc():
  assert host_memory.configure()


@glibc
def test_trim_returns_freed_heap_to_the_os():
  libc = ctypes.CDLL('libc.so.6')
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = [ctypes.c_void_p]
  libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
  size, n = 64 * 1024, 3200   # 200 MiB of heap blocks below the mmap threshold
  blocks = [libc.malloc(size) for _ in range(n)]
  for b in blocks:
    libc.memset(b, 1, size)
  pin = libc.malloc(size)      # keeps the top of the heap busy: no automatic trim
  libc.memset(pin, 1, size)
  for b in blocks:
    libc.free(b)
  before = _rss_mib()
  host_memory.trim()
  after = _rss_mib()
  libc.free(pin)
  assert before - after > 150, (before, after)
