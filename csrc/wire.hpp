// Packet wire format shared by every codec.
//
// A packet is a fixed header followed by the payload; all integers are
// little-endian. The number of bytes charged to the simulated network is
// exactly the packet length.
//
//   offset  size  field
//        0     4  magic "PSIM"
//        4     1  version (kVersion)
//        5     1  codec id (Codec)
//        6     1  value dtype on the wire (DType)
//        7     1  source dtype, returned by unpack (DType)
//        8     1  ndim (0..kMaxDims)
//        9     1  flags (top-k: index code; int8/int4: rounding, 0 nearest,
//                 1 stochastic; zero for the other codecs)
//       10     2  reserved, zero
//       12     4  CRC-32C of the whole packet with this field read as zero
//       16     8  payload length in bytes
//       24  4*nd  shape, one uint32 per dimension
//        .     P  codec parameters: dense 0, topk 8 (k), randomk 16 (seed, k),
//                 lowrank 8 (rows, rank as uint32), int8/int4 12 (seed as
//                 uint64, zero for nearest rounding; block as uint32), topk2
//                 12 (k as uint64, block as uint32)
//        .     .  payload
//
// Rules for changing the layout: a new codec takes the next codec id and
// appends its parameters after the shape; any change to what an existing
// field means, or to which packets are valid, bumps kVersion. Version 2 added
// the int8/int4 codecs and made the flags byte zero for codecs without flags;
// topk2 (top-k with 2-bit values, id 6) came after it as a new codec.
//
// Validation: every size computed from header fields is overflow-checked
// (checked_mul/checked_add), the payload length must equal the codec's
// formula exactly, and decoding refuses a tensor larger than the caller's
// bound (Limits) before allocating it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <memory>
#include <new>
#include <utility>
#include <vector>

namespace pysim {

// Bytes held at once by Buffer allocations, now and at the peak since the last
// reset; lets tests bound what decoding a packet allocates.
size_t peak_buffer_bytes(bool reset);

// Memory for Buffer: blocks of 4 MiB and more are 2 MiB-aligned and advised
// as transparent huge pages (as NumPy does), so that a fresh decoded tensor
// costs a few page faults instead of one per 4 KiB. Both count their bytes.
void* buffer_alloc(size_t bytes);
void buffer_free(void* p, size_t bytes) noexcept;

// An allocator that leaves new elements uninitialised (packets and decoded
// tensors are written in full right after allocation, so zero-filling them
// first only costs time) and counts the bytes it holds.
template <typename T>
struct UninitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind { using other = UninitAllocator<U>; };
  UninitAllocator() = default;
  template <typename U>
  UninitAllocator(const UninitAllocator<U>&) {}
  T* allocate(size_t n) {
    if (n > static_cast<size_t>(-1) / sizeof(T)) throw std::bad_alloc();
    return static_cast<T*>(buffer_alloc(n * sizeof(T)));
  }
  void deallocate(T* p, size_t n) noexcept { buffer_free(p, n * sizeof(T)); }
  template <typename U>
  void construct(U* p) noexcept { ::new (static_cast<void*>(p)) U; }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) { ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...); }
};
template <typename T>
using Buffer = std::vector<T, UninitAllocator<T>>;
using Bytes = Buffer<uint8_t>;
using Floats = Buffer<float>;
using Indices = Buffer<uint32_t>;

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument(msg); }

// a * b and a + b, failing (ValueError) instead of wrapping around.
inline uint64_t checked_mul(uint64_t a, uint64_t b, const char* what) {
  uint64_t r;
  if (__builtin_mul_overflow(a, b, &r)) fail(std::string(what) + ": size overflows 64 bits");
  return r;
}
inline uint64_t checked_add(uint64_t a, uint64_t b, const char* what) {
  uint64_t r;
  if (__builtin_add_overflow(a, b, &r)) fail(std::string(what) + ": size overflows 64 bits");
  return r;
}

constexpr uint32_t kMagic = 0x4D495350u;  // bytes 'P' 'S' 'I' 'M'
constexpr uint8_t kVersion = 2;
constexpr int kMaxDims = 8;
constexpr size_t kBaseHeaderBytes = 24;

enum class Codec : uint8_t { Dense = 0, TopK = 1, RandomK = 2, LowRank = 3, Int8 = 4, Int4 = 5, TopK2 = 6 };
constexpr int kNumCodecs = 7;
const char* codec_name(Codec c);
Codec codec_from_int(int v);
enum class DType : uint8_t { F32 = 0, F16 = 1, BF16 = 2 };
enum class IndexCode : uint8_t { EliasFano = 0, Raw32 = 1 };

size_t dtype_bytes(DType d);
DType dtype_from_int(int v);
size_t codec_param_bytes(Codec c);
inline size_t header_bytes(Codec c, size_t ndim) {
  return kBaseHeaderBytes + 4 * ndim + codec_param_bytes(c);
}

// Everything the header says, decoded and validated.
struct Header {
  Codec codec = Codec::Dense;
  DType value_dtype = DType::F32;
  DType source_dtype = DType::F32;
  uint8_t flags = 0;
  std::vector<uint32_t> shape;
  uint64_t numel = 0;
  uint64_t payload_bytes = 0;
  uint64_t k = 0;      // topk, randomk, topk2
  uint64_t seed = 0;   // randomk
  uint32_t rows = 0;   // lowrank
  uint32_t rank = 0;   // lowrank
  uint32_t block = 0;  // int8, int4, topk2: elements (values) per scale
  size_t header_bytes = 0;
};

// Largest tensor (elements) a packet may describe, and what unpack accepts
// when the caller gives no bound of its own.
constexpr uint64_t kMaxNumel = uint64_t{1} << 40;
constexpr uint64_t kDefaultMaxNumel = uint64_t{1} << 26;  // 256 MiB of decoded float32

// What the caller of a decode expects: at most max_numel elements and, when
// expect_shape is set, exactly that shape.
struct Limits {
  uint64_t max_numel = kDefaultMaxNumel;
  const std::vector<uint32_t>* expect_shape = nullptr;
};

// Throws std::invalid_argument (ValueError in Python) for a bad shape.
uint64_t checked_numel(const std::vector<uint32_t>& shape);

// Writes h's header (checksum field zero) at p, which holds header_bytes(h.codec,
// h.shape.size()) bytes; sets h.numel and h.header_bytes.
void write_header(Header& h, uint8_t* p);
// Allocates header + payload, writes the header; the caller fills the payload
// (at out.data() + h.header_bytes) and then calls seal().
Bytes start_packet(Header& h);
void seal(Bytes& packet);
// The checksum field of a packet's header (a packet sealed piece by piece: pieces.hpp).
void put_checksum(uint8_t* packet, uint32_t crc);
uint32_t stored_checksum(const uint8_t* packet);

// Parses and validates a packet's frame: magic, version, ids, sizes, checksum.
// Throws std::invalid_argument with a message that says what is wrong. The
// codec-specific structure is checked by read_packet (codecs.hpp).
Header parse_packet(const uint8_t* data, size_t len);
// The total length header + payload that a packet's first bytes announce
// (validating only magic, version, codec id and ndim); for splitting bundles.
uint64_t announced_length(const uint8_t* data, size_t len);

uint32_t crc32c(const uint8_t* data, size_t len, uint32_t crc = 0);


}  // namespace pysim
