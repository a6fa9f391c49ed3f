// pybind11 module longalign_ops._C: the packer and the CPU position twin over numpy buffers.
// No torch headers: the build never needs torch, and one wheel serves any torch version.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "packer/packer.h"
#include "positions/positions_cpu.h"

namespace py = pybind11;
using I64 = py::array_t<int64_t, py::array::c_style>;
using I32 = py::array_t<int32_t, py::array::c_style>;

namespace {

template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(static_cast<py::ssize_t>(heap->size()), heap->data(), owner);
}

const int64_t* optional_ptr(const py::object& o) {
  if (o.is_none()) return nullptr;
  return o.cast<I64>().data();
}

py::dict pack(I64 lengths, const longalign::PackConfig& cfg) {
  longalign::PackResult r;
  {
    py::gil_scoped_release release;
    r = longalign::pack(lengths.data(), lengths.size(), cfg);
  }
  py::dict out;
  out["order"] = to_numpy(std::move(r.order));
  out["offsets"] = to_numpy(std::move(r.offsets));
  out["effective_lengths"] = to_numpy(std::move(r.effective_lengths));
  out["dropped"] = to_numpy(std::move(r.dropped));
  out["truncated"] = to_numpy(std::move(r.truncated));
  out["num_steps"] = r.num_steps;
  out["efficiency"] = r.efficiency;
  out["padding_ratio"] = r.padding_ratio;
  out["imbalance"] = r.imbalance;
  out["est_speedup_vs_naive"] = r.est_speedup_vs_naive;
  out["est_cost"] = r.est_cost;
  out["real_tokens"] = r.real_tokens;
  out["paid_tokens"] = r.paid_tokens;
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "longalign_ops C++ core: length packer and CPU position synthesis";

  py::class_<longalign::PackConfig>(m, "PackConfig")
      .def(py::init<>())
      .def_readwrite("max_tokens", &longalign::PackConfig::max_tokens)
      .def_readwrite("strategy", &longalign::PackConfig::strategy)
      .def_readwrite("world_size", &longalign::PackConfig::world_size)
      .def_readwrite("batch_size", &longalign::PackConfig::batch_size)
      .def_readwrite("batch_size_given", &longalign::PackConfig::batch_size_given)
      .def_readwrite("balance", &longalign::PackConfig::balance)
      .def_readwrite("overlong", &longalign::PackConfig::overlong)
      .def_readwrite("seed", &longalign::PackConfig::seed)
      .def_readwrite("linear_cost", &longalign::PackConfig::linear_cost);

  m.def("pack", &pack, py::arg("lengths"), py::arg("config"));

  m.def(
      "positions_chunk_base",
      [](I32 cu, py::object prefix, py::object suffix, int64_t chunk_size, int64_t num_chunks) {
        return to_numpy(longalign::positions_chunk_base(cu.data(), cu.size() - 1, optional_ptr(prefix),
                                                        optional_ptr(suffix), chunk_size, num_chunks));
      },
      py::arg("cu_seqlens"), py::arg("prefix"), py::arg("suffix"), py::arg("chunk_size"), py::arg("num_chunks"));

  m.def(
      "synthesize_positions",
      [](I32 cu, I64 target, py::object prefix, py::object suffix, int method, int64_t chunk_size,
         int64_t num_chunks, uint64_t seed, bool one_pass) {
        const int64_t B = cu.size() - 1;
        if (B < 0 || target.size() != B) throw std::invalid_argument("target_len must have one entry per sequence");
        const int64_t total = B >= 0 ? cu.data()[B] : 0;
        I64 out(total);
        const int64_t* p = optional_ptr(prefix);
        const int64_t* s = optional_ptr(suffix);
        {
          py::gil_scoped_release release;
          longalign::synthesize_positions_cpu(cu.data(), B, target.data(), p, s, method, chunk_size, num_chunks,
                                              seed, out.mutable_data(), one_pass);
        }
        return out;
      },
      py::arg("cu_seqlens"), py::arg("target_len"), py::arg("prefix"), py::arg("suffix"), py::arg("method"),
      py::arg("chunk_size"), py::arg("num_chunks"), py::arg("seed"), py::arg("one_pass") = false);
}
