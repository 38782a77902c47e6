/* One pass over a region array, for the daemon's harvest path (tracking/summary.py).
 *
 * bounds holds n_regions [start, end) pairs of byte addresses, row_words u64 apart: 2 for a
 * region array (s0, e0, s1, e1, ...), 3 for the page_region rows PAGEMAP_SCAN writes
 * (start, end, categories). The pass checks what the wire codec requires (page-aligned
 * bounds, start < end, sorted and not overlapping, base <= s0), counts pages and the rows
 * that touch the previous one, and, when not NULL,
 * - copy receives the [start, end) pairs as a contiguous (n_regions, 2) array, and
 * - pairs receives the (gap, n) pairs of the wire format in pages from base as u32
 *   (writewatch.v1.PackedRegions.pairs, little-endian on the hosts the daemon runs on).
 * A value over 2**32 - 1 is not written: the summary's max_step tells the caller to use the
 * wide encoding instead. Right after a page-table walk the caches hold what the walk left
 * and every separate call or pass over the rows costs several times its warm time; this is
 * one call and one pass for the copy out of the scan buffer, the counts and the encoding.
 */
#include <stddef.h>
#include <stdint.h>

enum ww_regions_result {
	WW_REGIONS_OK = 0,
	WW_REGIONS_MISALIGNED = 1,
	WW_REGIONS_EMPTY_ROW = 2,
	WW_REGIONS_UNSORTED = 3,
	WW_REGIONS_BASE_ABOVE = 4,
};

struct ww_region_summary {
	uint64_t n_pages;    /* pages inside all the regions */
	uint64_t n_touching; /* rows that start exactly where the previous one ends */
	uint64_t max_step;   /* the largest gap or length, in pages */
};

size_t ww_summary_size(void) { return sizeof(struct ww_region_summary); }

int ww_summarize(const uint64_t *bounds, size_t row_words, size_t n_regions, uint64_t base, unsigned page_shift,
		 uint64_t *copy, uint32_t *pairs, struct ww_region_summary *summary)
{
	const uint64_t mask = (1ULL << page_shift) - 1;
	uint64_t previous = base, n_pages = 0, n_touching = 0, max_step = 0;
	if (n_regions && bounds[0] < base)
		return WW_REGIONS_BASE_ABOVE;
	for (size_t i = 0; i < n_regions; i++) {
		uint64_t start = bounds[row_words * i], end = bounds[row_words * i + 1];
		if ((start | end) & mask)
			return WW_REGIONS_MISALIGNED;
		if (start >= end)
			return WW_REGIONS_EMPTY_ROW;
		if (start < previous)
			return WW_REGIONS_UNSORTED;
		if (i && start == previous)
			n_touching++;
		if (copy) {
			copy[2 * i] = start;
			copy[2 * i + 1] = end;
		}
		uint64_t gap = (start - previous) >> page_shift, length = (end - start) >> page_shift;
		n_pages += length;
		if (gap > max_step)
			max_step = gap;
		if (length > max_step)
			max_step = length;
		if (pairs && max_step <= UINT32_MAX) {
			pairs[2 * i] = (uint32_t)gap;
			pairs[2 * i + 1] = (uint32_t)length;
		}
		previous = end;
	}
	summary->n_pages = n_pages;
	summary->n_touching = n_touching;
	summary->max_step = max_step;
	return WW_REGIONS_OK;
}
