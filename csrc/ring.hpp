// The hops of a ring all-reduce between the members of one process, run in memory.
//
// A process that hosts several members of a ring moves their packets through
// memory: member i's packet for member i+1 is written into an arena of packet
// slots and read from there, with the same bytes, header and CRC-32C as on a
// wire (wire.hpp). One call runs every hop of a phase, so the cost per hop is
// the codec's work, not an interpreter's.
//
// A hop reads the dense packet at in_off (checked whole: header and checksum,
// with unpack's messages) and, by its mode:
//   kReduce:     writes encode(decode(in) + x[a:b]) as a packet at out_off
//                (the reduce-scatter: the sum in float32, re-encoded);
//   kReduceOwn:  the same, and r[a:b] = decode(out) / divisor (the hop that
//                completes the chunk the member owns; it keeps what it sends);
//   kGather:     r[a:b] = decode(in) / divisor (the all-gather; the packet is
//                forwarded by reading the same slot, no copy).
// divisor is the size of the member's ring (its group), as a float32 division.
// x and r are member `row`'s input and result (size values each); packets hold
// the 1-D chunk [a, b) in value dtype d, source dtype float32.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "wire.hpp"

namespace pysim {

enum class HopMode : int64_t { Reduce = 1, ReduceOwn = 2, Gather = 3 };

struct RingHop {
  int64_t mode, in_off, out_off, row, a, b, divisor;
};

// Bytes of a 1-D dense packet of n values of dtype d.
size_t dense_packet_bytes(size_t n, DType d);

// Runs `hops` in order (see above). Every offset and range is checked against
// the buffers before the first hop runs; a packet that is not the expected one
// (corrupted, truncated, of another tensor) throws std::invalid_argument.
void ring_hops(uint8_t* arena, size_t arena_len, const std::vector<const float*>& xs, const std::vector<float*>& rs,
               size_t size, DType d, const RingHop* hops, size_t nhops);

}  // namespace pysim
