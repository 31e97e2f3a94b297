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
//        9     1  flags (top-k: index code)
//       10     2  reserved, zero
//       12     4  CRC-32C of the whole packet with this field read as zero
//       16     8  payload length in bytes
//       24  4*nd  shape, one uint32 per dimension
//        .     P  codec parameters: dense 0, topk 8 (k), randomk 16 (seed, k),
//                 lowrank 8 (rows, rank as uint32)
//        .     .  payload
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <memory>
#include <utility>
#include <vector>

namespace pysim {

// An allocator that leaves new elements uninitialised: packets are written in
// full right after allocation, so zero-filling them first only costs time.
template <typename T>
struct UninitAllocator : std::allocator<T> {
  template <typename U>
  struct rebind { using other = UninitAllocator<U>; };
  UninitAllocator() = default;
  template <typename U>
  UninitAllocator(const UninitAllocator<U>&) {}
  template <typename U>
  void construct(U* p) noexcept { ::new (static_cast<void*>(p)) U; }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) { ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...); }
};
using Bytes = std::vector<uint8_t, UninitAllocator<uint8_t>>;
using Floats = std::vector<float, UninitAllocator<float>>;

constexpr uint32_t kMagic = 0x4D495350u;  // bytes 'P' 'S' 'I' 'M'
constexpr uint8_t kVersion = 1;
constexpr int kMaxDims = 8;
constexpr size_t kBaseHeaderBytes = 24;

enum class Codec : uint8_t { Dense = 0, TopK = 1, RandomK = 2, LowRank = 3 };
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
  uint64_t k = 0;      // topk, randomk
  uint64_t seed = 0;   // randomk
  uint32_t rows = 0;   // lowrank
  uint32_t rank = 0;   // lowrank
  size_t header_bytes = 0;
};

// Throws std::invalid_argument (ValueError in Python) for a bad shape.
uint64_t checked_numel(const std::vector<uint32_t>& shape);

// Allocates header + payload, writes the header; the caller fills the payload
// (at out.data() + h.header_bytes) and then calls seal().
Bytes start_packet(Header& h);
void seal(Bytes& packet);

// Parses and validates a packet: magic, version, sizes, checksum. Throws
// std::invalid_argument with a message that says what is wrong.
Header parse_packet(const uint8_t* data, size_t len);

uint32_t crc32c(const uint8_t* data, size_t len, uint32_t crc = 0);

[[noreturn]] inline void fail(const std::string& msg) { throw std::invalid_argument(msg); }

}  // namespace pysim
