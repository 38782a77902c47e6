/* One pass over a region array, for the daemon's harvest path (tracking/summary.py).
 *
 * The pass checks what the wire codec requires (page-aligned bounds, start < end, sorted
 * and not overlapping, base <= the first start), counts pages and the rows that touch the
 * previous one, and, when pairs is not NULL, writes the (gap, n) pairs of the wire format in
 * pages from base as u32 (writewatch.v1.PackedRegions.pairs, little-endian on the hosts the
 * daemon runs on). A value over 2**32 - 1 is not written: the summary's max_step tells the
 * caller to use the wide encoding instead.
 *
 * ww_summarize reads a region array: n_regions [start, end) pairs, s0, e0, s1, e1, ...
 * ww_copy_scan reads the page_region rows PAGEMAP_SCAN wrote ({start, end, categories}),
 * copies their [start, end) pairs out as a contiguous (n_regions, 2) array and summarizes
 * them from the first start, in the same pass.
 *
 * Right after a page-table walk the caches hold what the walk left, and every separate call
 * or pass over the rows costs several times its warm time: this is one call and one pass for
 * the copy out of the scan buffer, the counts and the encoding.
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

/* Rows of row_words u64 each, the first two being [start, end); inlined with a constant row_words. */
static inline int pass(const uint64_t *bounds, const size_t row_words, size_t n_regions, uint64_t base,
		       unsigned page_shift, uint64_t *copy, uint32_t *pairs, struct ww_region_summary *summary)
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

int ww_summarize(const uint64_t *bounds, size_t n_regions, uint64_t base, unsigned page_shift, uint32_t *pairs,
		 struct ww_region_summary *summary)
{
	return pass(bounds, 2, n_regions, base, page_shift, NULL, pairs, summary);
}

int ww_copy_scan(const uint64_t *rows, size_t n_regions, unsigned page_shift, uint64_t *copy, uint32_t *pairs,
		 struct ww_region_summary *summary)
{
	return pass(rows, 3, n_regions, n_regions ? rows[0] : 0, page_shift, copy, pairs, summary);
}
