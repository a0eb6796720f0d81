from __future__ import annotations

import subprocess
import sys

from disagg.kv.block_hash import block_hashes, hash_block


def test_a_block_hash_covers_its_whole_prefix_and_the_model():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], block_size=4, model="m")
    assert len(a) == 2  # the partial tail has no hash
    assert a == block_hashes([1, 2, 3, 4, 5, 6, 7, 8], block_size=4, model="m")
    b = block_hashes([0, 2, 3, 4, 5, 6, 7, 8], block_size=4, model="m")
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different prefix
    assert a != block_hashes([1, 2, 3, 4, 5, 6, 7, 8], block_size=4, model="other")
    assert a[1] == hash_block(a[0], [5, 6, 7, 8], "m")


def test_hashes_agree_across_processes():
    code = "from disagg.kv.block_hash import block_hashes; print(block_hashes([3] * 8, 4, 'm'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(block_hashes([3] * 8, 4, "m"))
