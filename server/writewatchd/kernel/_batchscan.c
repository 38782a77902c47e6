/* Harvest many (pagemap fd, range) requests in one call: the daemon's per-tick path.
 *
 * Each request is scanned with PAGEMAP_SCAN, WP_MATCHING | CHECK_WPASYNC, category and
 * return mask PAGE_IS_WRITTEN (the same call as PagemapScanner.harvest), into one shared
 * output vector: request i's regions are vec[first_region, first_region + n_regions).
 * A request whose ioctl fails keeps its errno in `error` and the batch goes on with the
 * next one. The walk of a range follows the safe completion rule of pagemap.py: a full
 * buffer continues at max(walk_end, end of the last region), never at walk_end alone.
 *
 * When the shared vector fills up, the request being scanned gets resume_at < end and
 * ww_harvest_batch returns its index: the caller saves the regions so far and calls again
 * from that request (starting at resume_at). It returns n_requests once all are done.
 * Called through ctypes, which releases the GIL for the whole batch.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>

struct ww_page_region {
	uint64_t start;
	uint64_t end;
	uint64_t categories;
};

/* struct pm_scan_arg of linux/fs.h (Linux >= 6.7), spelled out so that older headers build. */
struct ww_pm_scan_arg {
	uint64_t size;
	uint64_t flags;
	uint64_t start;
	uint64_t end;
	uint64_t walk_end;
	uint64_t vec;
	uint64_t vec_len;
	uint64_t max_pages;
	uint64_t category_inverted;
	uint64_t category_mask;
	uint64_t category_anyof_mask;
	uint64_t return_mask;
};

struct ww_scan_request {
	int32_t fd;            /* in: the target's open /proc/PID/pagemap */
	int32_t error;         /* out: errno of the failed ioctl, else 0 */
	uint64_t start;        /* in: page aligned */
	uint64_t end;          /* in */
	uint64_t first_region; /* out: index of its first region in vec */
	uint64_t n_regions;    /* out */
	uint64_t resume_at;    /* out: end once complete, else where to continue */
};

#define WW_PM_SCAN_WP_MATCHING (1ULL << 0)
#define WW_PM_SCAN_CHECK_WPASYNC (1ULL << 1)
#define WW_PAGE_IS_WRITTEN (1ULL << 1)
#define WW_PAGEMAP_SCAN _IOWR('f', 16, struct ww_pm_scan_arg)

size_t ww_request_size(void) { return sizeof(struct ww_scan_request); }

size_t ww_harvest_batch(struct ww_scan_request *requests, size_t n_requests, struct ww_page_region *vec,
			size_t vec_len, size_t *n_used)
{
	struct ww_pm_scan_arg arg = {
		.size = sizeof(arg),
		.flags = WW_PM_SCAN_WP_MATCHING | WW_PM_SCAN_CHECK_WPASYNC,
		.category_mask = WW_PAGE_IS_WRITTEN,
		.return_mask = WW_PAGE_IS_WRITTEN,
	};
	size_t used = 0;
	for (size_t i = 0; i < n_requests; i++) {
		struct ww_scan_request *request = &requests[i];
		uint64_t position = request->start;
		request->error = 0;
		request->first_region = used;
		request->n_regions = 0;
		request->resume_at = request->end;
		while (position < request->end) {
			if (used == vec_len) {
				request->resume_at = position;
				*n_used = used;
				return i;
			}
			arg.start = position;
			arg.end = request->end;
			arg.vec = (uint64_t)(uintptr_t)(vec + used);
			arg.vec_len = vec_len - used;
			int n = ioctl(request->fd, WW_PAGEMAP_SCAN, &arg);
			if (n < 0) {
				request->error = errno;
				break;
			}
			used += (size_t)n;
			request->n_regions += (uint64_t)n;
			if ((uint64_t)n < arg.vec_len)
				break;
			position = arg.walk_end;
			if (n > 0 && vec[used - 1].end > position)
				position = vec[used - 1].end;
		}
	}
	*n_used = used;
	return n_requests;
}
