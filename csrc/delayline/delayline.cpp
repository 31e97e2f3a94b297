// delayline: a userspace link emulator for measuring TCP over links with real round-trip times.
//
// N network namespaces talk through N TUN devices (IFF_TUN | IFF_NO_PI) that this program
// creates and whose file descriptors it keeps. Node i is 10.78.0.(i+1); an IPv4 packet read
// from node i's device goes to the node its destination address names, through pysim's link
// model (pysim/network.py): node i's uplink, a constant one-way delay, node j's downlink. Each
// link is a drop-tail FIFO served at the rate:
//
//   uplink:   leaves = max(read, uplink free)            + 8 * bytes / rate
//   downlink: leaves = max(leaves_up + delay, down free) + 8 * bytes / rate   (written to j then)
//
// bytes = the IP packet's length (what a TUN device carries) + --overhead-bytes (default 0).
// A link whose waiting bytes plus the arriving packet would exceed --queue-bytes drops it.
// Anything not IPv4 or not for 10.78.0.1 .. 10.78.0.N is dropped and counted.
//
// Usage: delayline --tun DEV0,DEV1[,...] --rate-bps BITS_PER_S --delay-us MICROSECONDS
//                  [--queue-bytes BYTES] [--overhead-bytes BYTES] [--stats FILE]
//
// It prints "ready" on stdout once every device exists (the caller then moves each into its
// namespace: a TUN device keeps working after `ip link set dev X netns NS` while this process
// holds its fd). SIGTERM, SIGINT or SIGHUP (also sent when its parent dies) end it: it writes
// the statistics (JSON) to --stats and a summary line to stderr. The devices are not
// persistent, so they vanish with the process, however it ends.
//
// Timing: CLOCK_MONOTONIC; epoll over the TUN fds with a nanosecond timeout to the next due
// packet, spinning (zero timeouts) when it is due within 50 us, since a sleep overshoots by
// tens of microseconds and a 1500-byte packet takes 12 us at 1 Gbit/s. Longer sleeps also end
// early by what sleeps of that length overshot lately (class Oversleep). A packet's arrival is
// when this process reads it: waking for it costs the same tens of microseconds.
//
// Build: g++ -O2 -std=c++17 -Wall -Wextra -o delayline delayline.cpp

#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <csignal>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <queue>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr uint8_t kNet[3] = {10, 78, 0};    // node i is 10.78.0.(i+1)
constexpr size_t kMaxNodes = 254;           // .1 .. .254
constexpr size_t kMaxPacket = 65535;        // the longest IPv4 packet
constexpr size_t kMtu = 1500;
constexpr int64_t kSpinNs = 50'000;         // spin instead of sleeping when a packet is due this soon
constexpr int kReadBatch = 64;              // packets read from one device before looking at the clock's due list
constexpr int64_t kNsPerS = 1'000'000'000;
constexpr int64_t kBucketNs = 1000;         // lateness histogram: 1 us buckets ...
constexpr size_t kBuckets = 100'000;        // ... up to 100 ms
constexpr uint32_t kSignalTag = UINT32_MAX; // epoll tag of the signalfd; the others are port numbers

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string errno_text() { return std::strerror(errno); }

int64_t now_ns() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * kNsPerS + ts.tv_nsec;
}

// An owned file descriptor, closed when it goes out of scope.
class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    std::swap(fd_, o.fd_);
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

// ---------------------------------------------------------------- options

struct Options {
  std::vector<std::string> tun;
  uint64_t rate_bps = 0;
  int64_t delay_ns = -1;
  uint64_t queue_bytes = 0;  // 0: one second of traffic at the rate (at least two full packets)
  uint64_t overhead_bytes = 0;
  std::string stats_path;
};

const char kUsage[] =
    "usage: delayline --tun DEV0,DEV1[,...] --rate-bps BITS_PER_S --delay-us MICROSECONDS\n"
    "                 [--queue-bytes BYTES] [--overhead-bytes BYTES] [--stats FILE]\n"
    "Joins N TUN devices (node i = 10.78.0.(i+1)) through uplink -> one-way delay -> downlink,\n"
    "each link a drop-tail FIFO at the rate; bytes charged = IP length + overhead.\n"
    "--queue-bytes defaults to one second of traffic at the rate. Prints 'ready' once the\n"
    "devices exist; SIGTERM/SIGINT end it and write the statistics (JSON) to --stats.\n";

uint64_t parse_uint(const std::string& flag, const std::string& text, uint64_t lo, uint64_t hi) {
  const bool digits = !text.empty() && text.size() <= 20 &&
                      std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
  errno = 0;
  const unsigned long long v = digits ? std::strtoull(text.c_str(), nullptr, 10) : 0;
  if (!digits || errno == ERANGE || v < lo || v > hi)
    throw UsageError(flag + " needs a whole number in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                     "], got '" + text + "'");
  return v;
}

// Device names: what the kernel accepts (1-15 bytes) restricted to characters that need no
// quoting in the statistics' JSON or on a command line.
std::vector<std::string> parse_devices(const std::string& text) {
  std::vector<std::string> names;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = std::min(text.find(',', start), text.size());
    const std::string name = text.substr(start, comma - start);
    const bool ok = !name.empty() && name.size() < IFNAMSIZ && name != "." && name != ".." &&
                    std::all_of(name.begin(), name.end(), [](char c) {
                      return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                             c == '_' || c == '-' || c == '.';
                    });
    if (!ok) throw UsageError("--tun: bad device name '" + name + "' (1-15 of A-Z a-z 0-9 _ - .)");
    if (std::find(names.begin(), names.end(), name) != names.end())
      throw UsageError("--tun: device '" + name + "' given twice");
    names.push_back(name);
    start = comma + 1;
  }
  if (names.size() < 2 || names.size() > kMaxNodes)
    throw UsageError("--tun needs 2 to " + std::to_string(kMaxNodes) + " devices, got " +
                     std::to_string(names.size()));
  return names;
}

void apply_option(Options& o, const std::string& flag, const std::string& value) {
  if (flag == "--tun") {
    o.tun = parse_devices(value);
  } else if (flag == "--rate-bps") {
    o.rate_bps = parse_uint(flag, value, 1000, 1'000'000'000'000ULL);  // 1 kbit/s .. 1 Tbit/s
  } else if (flag == "--delay-us") {
    o.delay_ns = static_cast<int64_t>(parse_uint(flag, value, 0, 60'000'000)) * 1000;  // up to 60 s
  } else if (flag == "--queue-bytes") {
    o.queue_bytes = parse_uint(flag, value, 1, 1ULL << 40);
  } else if (flag == "--overhead-bytes") {
    o.overhead_bytes = parse_uint(flag, value, 0, 1000);
  } else if (flag == "--stats") {
    if (value.empty()) throw UsageError("--stats needs a file name");
    o.stats_path = value;
  } else {
    throw UsageError("unknown option '" + flag + "'");
  }
}

Options parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i], value;
    if (flag == "--help" || flag == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    const size_t eq = flag.find('=');
    if (eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag.resize(eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      throw UsageError(flag + " needs a value");
    }
    apply_option(o, flag, value);
  }
  if (o.tun.empty()) throw UsageError("--tun is required");
  if (o.rate_bps == 0) throw UsageError("--rate-bps is required");
  if (o.delay_ns < 0) throw UsageError("--delay-us is required");
  if (o.queue_bytes == 0) o.queue_bytes = std::max<uint64_t>(o.rate_bps / 8, 2 * (kMtu + o.overhead_bytes));
  return o;
}

// ---------------------------------------------------------------- the link model

// Times in ns for bytes at the rate, and back. Serialization rounds up, so a link never beats its rate.
struct Rate {
  uint64_t bps;
  int64_t serialize_ns(uint64_t bytes) const {  // bytes <= 66535: the product fits in 64 bits
    return static_cast<int64_t>((bytes * 8 * static_cast<uint64_t>(kNsPerS) + bps - 1) / bps);
  }
  uint64_t bytes_in(int64_t ns) const {
    return static_cast<uint64_t>(static_cast<unsigned __int128>(ns) * bps / (8 * static_cast<uint64_t>(kNsPerS)));
  }
};

// One direction of a node's access link: a FIFO served at the rate. Only when its last accepted
// packet finishes serialization is kept; the bytes still waiting at time t follow from that.
class Link {
 public:
  Link(Rate rate, uint64_t limit) : rate_(rate), limit_(limit) {}

  // When a packet of `bytes` arriving at `t` has left the link, or -1 if the link drops it
  // (drop-tail: the bytes waiting, the one being sent included, plus this one exceed the limit).
  int64_t admit(int64_t t, uint64_t bytes) {
    const uint64_t waiting = free_at_ > t ? rate_.bytes_in(free_at_ - t) : 0;
    if (waiting + bytes > limit_) {
      ++drops;
      return -1;
    }
    max_backlog = std::max(max_backlog, waiting + bytes);
    free_at_ = std::max(free_at_, t) + rate_.serialize_ns(bytes);
    return free_at_;
  }

  uint64_t drops = 0;
  uint64_t max_backlog = 0;  // bytes waiting just after a packet was accepted, at most

 private:
  Rate rate_;
  uint64_t limit_;
  int64_t free_at_ = INT64_MIN;
};

// The node an IPv4 packet is for, or one of the two reasons it is for none.
constexpr int kNotIpv4 = -1, kNoRoute = -2;

int destination(const uint8_t* p, size_t len, size_t nodes) {
  if (len < 20 || (p[0] >> 4) != 4) return kNotIpv4;
  if (p[16] != kNet[0] || p[17] != kNet[1] || p[18] != kNet[2] || p[19] < 1 || p[19] > nodes) return kNoRoute;
  return p[19] - 1;
}

// ---------------------------------------------------------------- packets in flight

struct Packet {
  std::vector<uint8_t> data;  // keeps its capacity when the slot is reused
  size_t to = 0;
  uint64_t seq = 0;
};

// Slots for the packets in flight, reused so that the steady state allocates nothing.
class Pool {
 public:
  uint32_t put(const uint8_t* p, size_t len, size_t to, uint64_t seq) {
    uint32_t id;
    if (free_.empty()) {
      if (packets_.size() >= UINT32_MAX - 1) throw std::runtime_error("too many packets in flight");
      id = static_cast<uint32_t>(packets_.size());
      packets_.emplace_back();  // a deque: references to the others stay valid
    } else {
      id = free_.back();
      free_.pop_back();
    }
    Packet& k = packets_[id];
    k.data.assign(p, p + len);
    k.to = to;
    k.seq = seq;
    return id;
  }
  const Packet& at(uint32_t id) const { return packets_[id]; }
  void release(uint32_t id) { free_.push_back(id); }

 private:
  std::deque<Packet> packets_;
  std::vector<uint32_t> free_;
};

// What happens next to a packet: it reaches the receiver's downlink, or leaves it (is written).
enum class Stage : uint8_t { Downlink, Write };

struct Event {
  int64_t due;
  uint64_t seq;  // the order packets were read: ties at one instant keep it
  uint32_t packet;
  Stage stage;
};

struct Later {
  bool operator()(const Event& a, const Event& b) const { return a.due != b.due ? a.due > b.due : a.seq > b.seq; }
};

// ---------------------------------------------------------------- statistics

struct PortStats {
  uint64_t rx_packets = 0, rx_bytes = 0;  // read from this node's device (IP bytes)
  uint64_t tx_packets = 0, tx_bytes = 0;  // written to it
  uint64_t drop_not_ipv4 = 0, drop_no_route = 0, write_errors = 0;
};

// How late writes were against their due time: exact maximum, 1 us histogram up to 100 ms.
class Lateness {
 public:
  Lateness() : buckets_(kBuckets + 1, 0) {}
  void add(int64_t ns) {
    ns = std::max<int64_t>(ns, 0);
    max_ns_ = std::max(max_ns_, ns);
    ++buckets_[std::min<size_t>(static_cast<size_t>(ns / kBucketNs), kBuckets)];
    ++count_;
  }
  uint64_t count() const { return count_; }
  double max_us() const { return static_cast<double>(max_ns_) / 1000; }
  uint64_t over_limit() const { return buckets_[kBuckets]; }
  // The upper edge (us) of the bucket holding quantile q; -1 if it lies beyond 100 ms.
  double quantile_us(double q) const {
    if (count_ == 0) return 0;
    const uint64_t rank = static_cast<uint64_t>(q * static_cast<double>(count_ - 1)) + 1;
    uint64_t seen = 0;
    for (size_t b = 0; b < kBuckets; ++b)
      if ((seen += buckets_[b]) >= rank) return static_cast<double>((b + 1) * kBucketNs) / 1000;
    return -1;
  }

 private:
  std::vector<uint64_t> buckets_;
  uint64_t count_ = 0;
  int64_t max_ns_ = 0;
};

// ---------------------------------------------------------------- sleeping

// How much later than asked a sleep ends here, learnt from the sleeps so far, so that the loop
// wakes that much earlier and spins the rest. Measured on a 2-core VM: sleeps under 1 ms ended
// 20-70 us late, sleeps of 5-20 ms 100-130 us late (deeper idle), a few by milliseconds. Kept
// per class of sleep length (64 us, x4 each) as a decaying maximum, capped at 2 ms. At most half
// of a wait is given to the margin: the loop still sleeps, so an outlier is unlearnt (a margin
// above the whole wait would never sleep again, spinning a core at 100 Mbit/s).
class Oversleep {
 public:
  int64_t margin(int64_t sleep_ns) const { return std::min(late_[length_class(sleep_ns)], sleep_ns / 2); }
  void observe(int64_t sleep_ns, int64_t late_ns) {
    int64_t& e = late_[length_class(sleep_ns)];
    e = std::clamp<int64_t>(std::max(late_ns, e - e / 16), 0, kMaxMarginNs);
  }

 private:
  static constexpr int64_t kMaxMarginNs = 2'000'000;
  static size_t length_class(int64_t ns) {
    size_t c = 0;
    for (ns /= 64'000; ns > 0 && c + 1 < kClasses; ns /= 4) ++c;
    return c;
  }
  static constexpr size_t kClasses = 6;
  std::array<int64_t, kClasses> late_{};
};

// ---------------------------------------------------------------- the forwarder

class Forwarder {
 public:
  Forwarder(const Options& opt, std::vector<Fd> tuns, Fd signals)
      : opt_(opt), rate_{opt.rate_bps}, tuns_(std::move(tuns)), signals_(std::move(signals)),
        stats_(tuns_.size()), buf_(kMaxPacket) {
    for (size_t i = 0; i < tuns_.size(); ++i) {
      up_.emplace_back(rate_, opt.queue_bytes);
      down_.emplace_back(rate_, opt.queue_bytes);
    }
    epoll_ = Fd(epoll_create1(EPOLL_CLOEXEC));
    if (epoll_.get() < 0) throw std::runtime_error("epoll_create1: " + errno_text());
    watch(signals_.get(), kSignalTag);
    for (size_t i = 0; i < tuns_.size(); ++i) watch(tuns_[i].get(), static_cast<uint32_t>(i));
  }

  // Forwards until a signal arrives.
  void run() {
    for (;;) {
      run_due();
      const int n = wait_for_input();
      for (int i = 0; i < n; ++i) {
        if (ready_[i].data.u32 == kSignalTag) return;
        read_port(ready_[i].data.u32);
      }
    }
  }

  std::string stats_json(double seconds) const;
  std::string summary() const;

 private:
  void watch(int fd, uint32_t tag) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u32 = tag;
    if (epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) < 0) throw std::runtime_error("epoll_ctl: " + errno_text());
  }

  // Waits for a device to be readable or a signal (their count in ready_): with nothing in
  // flight, for ever; when the next packet is due within kSpinNs, not at all (the loop spins);
  // otherwise until kSpinNs plus the learnt oversleep before it is due.
  int wait_for_input() {
    const int64_t ahead = agenda_.empty() ? -1 : agenda_.top().due - kSpinNs - now_ns();
    const int64_t sleep = ahead > 0 ? ahead - oversleep_.margin(ahead) : 0;
    const int64_t wake = now_ns() + std::max<int64_t>(sleep, 0);
    timespec wait{};
    if (sleep > 0) wait = timespec{static_cast<time_t>(sleep / kNsPerS), static_cast<long>(sleep % kNsPerS)};
    const int n = epoll_pwait2(epoll_.get(), ready_.data(), static_cast<int>(ready_.size()),
                               agenda_.empty() ? nullptr : &wait, nullptr);
    if (n < 0 && errno == EINTR) return 0;
    if (n < 0) throw std::runtime_error("epoll_pwait2: " + errno_text());
    if (n == 0 && sleep > 0) oversleep_.observe(ahead, now_ns() - wake);
    return n;
  }

  bool write_due(int64_t now) const { return !agenda_.empty() && agenda_.top().due <= now; }

  // Reads what node `port` sent, stopping early when a write falls due so that reading a
  // burst does not delay the packets already scheduled.
  void read_port(size_t port) {
    for (int k = 0; k < kReadBatch; ++k) {
      const ssize_t n = read(tuns_[port].get(), buf_.data(), buf_.size());
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return;  // EAGAIN: drained; EIO etc.: the device is down, nothing to read
      const int64_t now = now_ns();
      accept(port, buf_.data(), static_cast<size_t>(n), now);
      if (write_due(now)) return;
    }
  }

  void accept(size_t from, const uint8_t* p, size_t len, int64_t now) {
    PortStats& s = stats_[from];
    ++s.rx_packets;
    s.rx_bytes += len;
    const int to = destination(p, len, tuns_.size());
    if (to == kNotIpv4) return void(++s.drop_not_ipv4);
    if (to == kNoRoute) return void(++s.drop_no_route);
    const int64_t sent = up_[from].admit(now, len + opt_.overhead_bytes);
    if (sent < 0) return;
    const uint64_t seq = next_seq_++;
    agenda_.push(Event{sent + opt_.delay_ns, seq, pool_.put(p, len, static_cast<size_t>(to), seq), Stage::Downlink});
  }

  void run_due() {
    while (write_due(now_ns())) {
      const Event ev = agenda_.top();
      agenda_.pop();
      if (ev.stage == Stage::Downlink) {
        reach_downlink(ev);
      } else {
        write_out(ev);
      }
    }
  }

  // The packet reaches its receiver's downlink at its due time (not now: the queue it meets is
  // the one at that instant, whatever this process's own lateness).
  void reach_downlink(const Event& ev) {
    const Packet& k = pool_.at(ev.packet);
    const int64_t sent = down_[k.to].admit(ev.due, k.data.size() + opt_.overhead_bytes);
    if (sent < 0) return pool_.release(ev.packet);
    agenda_.push(Event{sent, ev.seq, ev.packet, Stage::Write});
  }

  void write_out(const Event& ev) {
    const Packet& k = pool_.at(ev.packet);
    PortStats& s = stats_[k.to];
    lateness_.add(now_ns() - ev.due);
    ssize_t n;
    do {
      n = write(tuns_[k.to].get(), k.data.data(), k.data.size());
    } while (n < 0 && errno == EINTR);
    if (n == static_cast<ssize_t>(k.data.size())) {
      ++s.tx_packets;
      s.tx_bytes += k.data.size();
    } else {
      ++s.write_errors;  // e.g. EIO while the device is still down
    }
    pool_.release(ev.packet);
  }

  const Options opt_;
  Rate rate_;
  std::vector<Fd> tuns_;
  Fd signals_, epoll_;
  std::vector<Link> up_, down_;
  std::vector<PortStats> stats_;
  std::priority_queue<Event, std::vector<Event>, Later> agenda_;
  Pool pool_;
  Lateness lateness_;
  Oversleep oversleep_;
  std::array<epoll_event, kMaxNodes + 1> ready_{};
  std::vector<uint8_t> buf_;
  uint64_t next_seq_ = 0;
};

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  va_list args, again;
  va_start(args, fmt);
  va_copy(again, args);
  const int n = std::vsnprintf(nullptr, 0, fmt, args);  // sized first: never a truncated line of JSON
  va_end(args);
  std::string out(static_cast<size_t>(std::max(n, 0)) + 1, '\0');
  std::vsnprintf(out.data(), out.size(), fmt, again);
  va_end(again);
  out.pop_back();
  return out;
}

std::string Forwarder::stats_json(double seconds) const {
  using ull = unsigned long long;
  std::string j = format("{\"rate_bps\": %llu, \"delay_us\": %lld, \"queue_bytes\": %llu, \"overhead_bytes\": %llu, "
                         "\"seconds\": %.6f, \"ports\": [",
                         ull(opt_.rate_bps), static_cast<long long>(opt_.delay_ns / 1000), ull(opt_.queue_bytes),
                         ull(opt_.overhead_bytes), seconds);
  PortStats total;
  uint64_t up_drops = 0, down_drops = 0;
  for (size_t i = 0; i < stats_.size(); ++i) {
    const PortStats& s = stats_[i];
    j += (i ? ", " : "") + format("{\"dev\": \"%s\", \"rx_packets\": %llu, \"rx_bytes\": %llu, \"tx_packets\": %llu, "
                                  "\"tx_bytes\": %llu, ",
                                  opt_.tun[i].c_str(), ull(s.rx_packets), ull(s.rx_bytes), ull(s.tx_packets),
                                  ull(s.tx_bytes));
    j += format("\"drops_not_ipv4\": %llu, \"drops_no_route\": %llu, \"drops_uplink_queue\": %llu, "
                "\"drops_downlink_queue\": %llu, \"write_errors\": %llu, \"max_uplink_queue_bytes\": %llu, "
                "\"max_downlink_queue_bytes\": %llu}",
                ull(s.drop_not_ipv4), ull(s.drop_no_route), ull(up_[i].drops), ull(down_[i].drops),
                ull(s.write_errors), ull(up_[i].max_backlog), ull(down_[i].max_backlog));
    total.drop_not_ipv4 += s.drop_not_ipv4;
    total.drop_no_route += s.drop_no_route;
    total.write_errors += s.write_errors;
    up_drops += up_[i].drops;
    down_drops += down_[i].drops;
  }
  j += format("], \"drops\": {\"not_ipv4\": %llu, \"no_route\": %llu, \"uplink_queue\": %llu, \"downlink_queue\": "
              "%llu, \"write_errors\": %llu}, ",
              ull(total.drop_not_ipv4), ull(total.drop_no_route), ull(up_drops), ull(down_drops),
              ull(total.write_errors));
  j += format("\"lateness_us\": {\"writes\": %llu, \"max\": %.1f, \"p50\": %.0f, \"p99\": %.0f, \"over_100ms\": %llu}}\n",
              ull(lateness_.count()), lateness_.max_us(), lateness_.quantile_us(0.5), lateness_.quantile_us(0.99),
              ull(lateness_.over_limit()));
  return j;
}

std::string Forwarder::summary() const {
  uint64_t rx = 0, tx = 0;
  for (const PortStats& s : stats_) rx += s.rx_packets, tx += s.tx_packets;
  return format("delayline: %llu packets read, %llu written; writes late by at most %.1f us, p99 <= %.0f us\n",
                static_cast<unsigned long long>(rx), static_cast<unsigned long long>(tx), lateness_.max_us(),
                lateness_.quantile_us(0.99));
}

// ---------------------------------------------------------------- setup

// SIGTERM, SIGINT and SIGHUP arrive through a descriptor the event loop watches, so a signal
// between two checks cannot be missed; blocked first, so one during setup waits for the loop.
Fd signal_fd() {
  sigset_t set;
  sigemptyset(&set);
  for (int sig : {SIGTERM, SIGINT, SIGHUP}) sigaddset(&set, sig);
  if (sigprocmask(SIG_BLOCK, &set, nullptr) < 0) throw std::runtime_error("sigprocmask: " + errno_text());
  std::signal(SIGPIPE, SIG_IGN);  // a closed stdout is an error to report, not a reason to die
  Fd fd(signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC));
  if (fd.get() < 0) throw std::runtime_error("signalfd: " + errno_text());
  return fd;
}

// A new non-persistent TUN device: it exists as long as this descriptor is open.
Fd open_tun(const std::string& name) {
  Fd fd(open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC));
  if (fd.get() < 0) throw std::runtime_error("cannot open /dev/net/tun: " + errno_text());
  ifreq ifr{};
  ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
  std::memcpy(ifr.ifr_name, name.data(), name.size());  // < IFNAMSIZ, checked by parse_devices
  if (ioctl(fd.get(), TUNSETIFF, &ifr) < 0) {
    const bool busy = errno == EBUSY;
    throw std::runtime_error("cannot create TUN device '" + name + "': " + errno_text() +
                             (busy ? " (another delay line holds it?)" : ""));
  }
  return fd;
}

void write_stats(const std::string& path, const std::string& json) {
  const std::string tmp = path + ".tmp";  // renamed over the target: a reader never sees half a file
  FILE* f = std::fopen(tmp.c_str(), "w");
  if (!f) throw std::runtime_error("cannot write " + tmp + ": " + errno_text());
  const bool written = std::fputs(json.c_str(), f) >= 0;
  if (std::fclose(f) != 0 || !written || std::rename(tmp.c_str(), path.c_str()) != 0)
    throw std::runtime_error("cannot write " + path + ": " + errno_text());
}

int run(int argc, char** argv) {
  const Options opt = parse_args(argc, argv);
  Fd signals = signal_fd();
  prctl(PR_SET_PDEATHSIG, SIGTERM);  // the rig that started it died: stop, so the devices vanish
  prctl(PR_SET_TIMERSLACK, 1UL);     // sleeps end when asked (default slack: 50 us late)
  std::vector<Fd> tuns;
  for (const std::string& name : opt.tun) tuns.push_back(open_tun(name));
  Forwarder forwarder(opt, std::move(tuns), std::move(signals));
  if (std::puts("ready") < 0 || std::fflush(stdout) != 0) throw std::runtime_error("cannot write to stdout");
  const int64_t start = now_ns();
  forwarder.run();
  const double seconds = static_cast<double>(now_ns() - start) / kNsPerS;
  if (!opt.stats_path.empty()) write_stats(opt.stats_path, forwarder.stats_json(seconds));
  std::fputs(forwarder.summary().c_str(), stderr);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "delayline: %s (--help for usage)\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "delayline: %s\n", e.what());
    return 1;
  }
}
