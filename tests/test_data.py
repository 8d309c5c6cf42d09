import torch

from training.data import block_order, micro_batch_indices, pack_by_language, pack_documents


def test_pack_documents_prepends_eos_and_drops_tail():
    blocks = pack_documents([[5, 6, 7], [8, 9]], eos_id=1, n_ctx=3)
    assert blocks.tolist() == [[1, 5, 6], [7, 1, 8]]  # the trailing 9 does not fill a block


def test_pack_by_language_keeps_blocks_monolingual():
    blocks, langs = pack_by_language([[2, 2, 2], [3, 3, 3], [2, 2, 2]], ["en", "fr", "en"], eos_id=1, n_ctx=4)
    assert langs == ["en", "en", "fr"][: len(blocks)]
    for block, lang in zip(blocks.tolist(), langs):
        assert set(block) - {1} == ({2} if lang == "en" else {3})


def test_block_order_visits_every_block_once_per_epoch():
    order = block_order(n_blocks=7, seed=3, start=0, count=21)
    for epoch in range(3):
        assert sorted(order[epoch * 7 : (epoch + 1) * 7].tolist()) == list(range(7))
    assert not torch.equal(order[:7], order[7:14])  # reshuffled each epoch
    assert torch.equal(block_order(7, 3, start=5, count=9), order[5:14])  # any window of the same stream


def test_ddp_ranks_read_what_accumulation_reads():
    single = micro_batch_indices(
        step=4, micro_batch=3, grad_accum=2, rank=0, world_size=1, n_blocks=50, seed=0
    )
    rank0 = micro_batch_indices(
        step=4, micro_batch=3, grad_accum=1, rank=0, world_size=2, n_blocks=50, seed=0
    )
    rank1 = micro_batch_indices(
        step=4, micro_batch=3, grad_accum=1, rank=1, world_size=2, n_blocks=50, seed=0
    )
    assert torch.equal(single[0], rank0[0]) and torch.equal(single[1], rank1[0])
